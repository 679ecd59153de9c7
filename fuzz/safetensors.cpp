// safetensors: ksa::SafetensorsFile::open on a file made from the input, and ksa::Checkpoint::open on an
// index file. Input: "RAW:" + a whole file; "IDX:" + model.safetensors.index.json text (next to a valid
// shard a.safetensors holding tensor "x"); otherwise the header text, written with its length and 4 KiB of
// data. Checks: only ksa::Error escapes, and every accepted tensor (q8_0 ones included) lies inside the file (its
// first and last elements are read, so ASan sees any escape from the mapping).
#include <filesystem>
#include <fstream>

#include "fuzz_util.hpp"
#include "ksa/safetensors.hpp"

namespace {

void check(const ksa::TensorInfo& t, int64_t file_size) {
  if (t.nbytes != ksa::dtype_bytes(t.dtype, t.numel()) || t.file_offset < 8 || t.file_offset + t.nbytes > file_size)
    std::abort();
  if (t.numel() > 0) {
    volatile float x = t.get(0) + t.get(t.numel() - 1);
    (void)x;
  }
}

std::string file_of_header(std::string_view header) {
  std::string f(8, '\0');
  for (int i = 0; i < 8; ++i) f[size_t(i)] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
  f.append(header);
  f.append(4096, '\x3f');
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ksa::fuzz::MemFile file("fuzz.safetensors");
  static const std::string dir = [] {
    char tmpl[] = "/tmp/ksa_fuzz_ckpt_XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    std::ofstream(std::string(tmpl) + "/a.safetensors", std::ios::binary)
        << file_of_header(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})");
    return std::string(tmpl);
  }();
  const std::string_view in = ksa::fuzz::as_text(data, size);
  if (in.substr(0, 4) == "IDX:") {
    std::ofstream(dir + "/model.safetensors.index.json", std::ios::binary | std::ios::trunc) << in.substr(4);
    ksa::fuzz::expect_only_ksa_errors([&] {
      const ksa::Checkpoint c = ksa::Checkpoint::open(dir);
      for (const ksa::TensorInfo& t : c.tensors()) check(t, int64_t(std::filesystem::file_size(t.file)));
    });
    return 0;
  }
  const std::string bytes = in.substr(0, 4) == "RAW:" ? std::string(in.substr(4)) : file_of_header(in);
  const std::string& path = file.write(bytes);
  ksa::fuzz::expect_only_ksa_errors([&] {
    const ksa::SafetensorsFile f = ksa::SafetensorsFile::open(path);
    for (const ksa::TensorInfo& t : f.tensors()) check(t, int64_t(bytes.size()));
  });
  return 0;
}
