#!/usr/bin/env bash
# Training text from Debian packages (public domain), for the training recipe (docs/training.md):
#   - Jane Austen's six novels: r-cran-janeaustenr (the text as an R data package), extracted with Debian's
#     R (r-base-core): one file per novel, lines joined by "\n", in .cache/data/austen/<name>.txt;
#   - the King James Bible: bible-kjv-text (the text in the format of bible-kjv's `bible` reader), printed with
#     `bible` and cleaned (no book/chapter headings, no verse numbers: one verse per line, a blank line between
#     chapters) into .cache/data/kjv/kjv.txt (31,102 verses, 4.1 MB); training text only (no held-out part).
# Split (held-out): the last 5% of each novel's lines (cut at a blank line, i.e. a paragraph boundary) goes to
# .cache/data/austen/heldout.txt (3,670 lines, 209 KB), the rest to train.txt (69,764 lines, 3.8 MB); both keep
# the novels' order. The text is ASCII.
#   scripts/fetch_train_data.sh [out dir (default .cache/data)]
# Installs only missing packages (apt-get update first; sudo when not root), as scripts/setup.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.cache/data}"

PACKAGES=(r-base-core r-cran-janeaustenr bible-kjv bible-kjv-text python3-regex python3-matplotlib)  # R extracts the text; the tokenizer trainer (regex) and the loss plot (matplotlib)
source scripts/install_missing.sh
install_missing fetch_train_data "${PACKAGES[@]}"

mkdir -p "$OUT/austen"
# One file per novel; then the split: the last 5% of the lines, moved forward to the next blank line.
Rscript --vanilla - "$OUT/austen" <<'RS'
args <- commandArgs(trailingOnly = TRUE)
out <- args[1]
suppressMessages(library(janeaustenr))
books <- list(sense_and_sensibility = sensesensibility, pride_and_prejudice = prideprejudice,
              mansfield_park = mansfieldpark, emma = emma, northanger_abbey = northangerabbey,
              persuasion = persuasion)
train <- c(); held <- c()
for (name in names(books)) {
  lines <- books[[name]]
  writeLines(lines, file.path(out, paste0(name, ".txt")), useBytes = TRUE)
  cut <- floor(length(lines) * 0.95)
  while (cut < length(lines) && nchar(lines[cut]) > 0) cut <- cut + 1
  train <- c(train, lines[1:cut], "")
  held <- c(held, lines[(cut + 1):length(lines)], "")
}
writeLines(train, file.path(out, "train.txt"), useBytes = TRUE)
writeLines(held, file.path(out, "heldout.txt"), useBytes = TRUE)
RS
for f in "$OUT"/austen/train.txt "$OUT"/austen/heldout.txt; do
  printf '%-40s %8d lines %9d bytes\n' "$f" "$(wc -l <"$f")" "$(wc -c <"$f")"
done

# The King James Bible: bible(1) prints every verse ("  N text", wrapped lines, "Book C" headings).
mkdir -p "$OUT/kjv"
bible "Gen1:1-Rev22:21" | awk '
  /^[[:space:]]*$/ { blank = 1; next }
  blank && !/^ / { if (verse != "") print verse; verse = ""; if (started) print ""; started = 1; blank = 0; next }
  /^ +[0-9]+ / { if (verse != "") print verse; sub(/^ +[0-9]+ /, ""); verse = $0; blank = 0; next }
  { verse = verse " " $0; blank = 0 }
  END { if (verse != "") print verse }' >"$OUT/kjv/kjv.txt"
printf '%-40s %8d lines %9d bytes\n' "$OUT/kjv/kjv.txt" "$(wc -l <"$OUT/kjv/kjv.txt")" "$(wc -c <"$OUT/kjv/kjv.txt")"
