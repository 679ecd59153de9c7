// safetensors: write/read round trip in every dtype, unaligned tensors, sharded checkpoints, and each kind
// of corrupted file giving its own message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "ksa/error.hpp"
#include "ksa/safetensors.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;

using test::error_of;

// A file from a header text and `data_bytes` bytes of data.
void raw_file(const std::string& path, const std::string& header, size_t data_bytes, uint64_t header_len_override = 0) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t n = header_len_override ? header_len_override : header.size();
  for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
  out << header;
  out << std::string(data_bytes, '\x01');
}

std::vector<float> random_values(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

TEST(Safetensors, RoundTripsEveryDtype) {
  test::TempDir t{"st"};
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  const std::vector<float> vals = random_values(6 * 5, 1);
  std::vector<uint8_t> bf(vals.size() * 2), hf(vals.size() * 2);
  for (size_t i = 0; i < vals.size(); ++i) {
    store_from_float(DType::bf16, bf.data(), int64_t(i), vals[i]);
    store_from_float(DType::f16, hf.data(), int64_t(i), vals[i]);
  }
  w.add("a.f32", DType::f32, {6, 5}, vals.data());
  w.add("b.bf16", DType::bf16, {6, 5}, bf.data());
  w.add("c.f16", DType::f16, {30}, hf.data());
  w.add("d.empty", DType::f32, {0, 4}, nullptr);
  w.write_file(t.path("x.safetensors"));
  const SafetensorsFile f = SafetensorsFile::open(t.path("x.safetensors"));
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const TensorInfo* a = f.find("a.f32");
  const TensorInfo* b = f.find("b.bf16");
  const TensorInfo* c = f.find("c.f16");
  ASSERT_TRUE(a && b && c && f.find("d.empty"));
  EXPECT_EQ(a->shape, (std::vector<int64_t>{6, 5}));
  EXPECT_EQ(a->shape_str(), "[6, 5]");
  EXPECT_EQ(c->dtype, DType::f16);
  EXPECT_EQ(f.find("d.empty")->numel(), 0);
  for (size_t i = 0; i < vals.size(); ++i) {
    EXPECT_EQ(a->get(int64_t(i)), vals[i]);
    EXPECT_EQ(b->get(int64_t(i)), round_to(DType::bf16, vals[i]));
    EXPECT_EQ(c->get(int64_t(i)), round_to(DType::f16, vals[i]));
  }
  EXPECT_EQ(b->to_f32()[7], round_to(DType::bf16, vals[7]));
  // HF pads the header to 8 bytes: with an 8-aligned mapping every tensor here is 8-aligned too.
  EXPECT_EQ((a->file_offset) % 8, 0);
}

TEST(Safetensors, ReadsUnalignedTensorsWithoutCastingPointers) {
  test::TempDir t{"st"};
  const std::vector<float> vals = random_values(33, 2);
  // An unpadded header whose length makes the data start at an odd offset (the mapping is page-aligned).
  for (int pad = 0; pad < 8; ++pad) {
    SafetensorsWriter w;
    w.set_metadata("pad", std::string(size_t(pad), 'x'));
    w.add("w", DType::f32, {33}, vals.data());
    w.write_file(t.path("u.safetensors"), 1);
    if (SafetensorsFile::open(t.path("u.safetensors")).tensors()[0].file_offset % 2 == 1) break;
  }
  const SafetensorsFile f = SafetensorsFile::open(t.path("u.safetensors"));
  const TensorInfo& x = f.tensors()[0];
  EXPECT_FALSE(x.aligned(4)) << "test setup: the tensor should be misaligned";
  for (int64_t i = 0; i < 33; ++i) EXPECT_EQ(x.get(i), vals[size_t(i)]);
  const AlignedData d(x, 64);
  EXPECT_TRUE(d.copied());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d.data()) % 64, 0u);
  float v5;
  std::memcpy(&v5, static_cast<const char*>(d.data()) + 5 * 4, 4);
  EXPECT_EQ(v5, vals[5]);
}

TEST(Safetensors, ShardedCheckpoint) {
  test::TempDir t{"st"};
  SafetensorsWriter w;
  std::vector<std::vector<float>> data;
  for (int i = 0; i < 5; ++i) {
    data.push_back(random_values(100, uint64_t(10 + i)));
    std::string name = "t";
    name += std::to_string(i);
    w.add(name, DType::f32, {10, 10}, data.back().data());
  }
  const auto files = w.write_checkpoint(t.dir().string(), 900);  // 400 bytes per tensor: two per shard
  EXPECT_EQ(files.size(), 4u);                                   // 3 shards + index
  EXPECT_TRUE(fs::exists(t.path("model-00001-of-00003.safetensors")));
  EXPECT_TRUE(fs::exists(t.path("model.safetensors.index.json")));
  const Checkpoint c = Checkpoint::open(t.dir().string());
  EXPECT_TRUE(c.sharded());
  EXPECT_EQ(c.files().size(), 3u);
  ASSERT_EQ(c.tensors().size(), 5u);
  EXPECT_EQ(c.total_bytes(), 2000);
  EXPECT_EQ(c.at("t3").get(42), data[3][42]);
  EXPECT_EQ(c.find("nope"), nullptr);
  EXPECT_EQ(error_of([&] { c.at("nope"); }), t.dir().string() + ": no tensor \"nope\"");

  // Rewriting as one file removes the shards.
  w.write_checkpoint(t.dir().string(), 1 << 20);
  EXPECT_FALSE(fs::exists(t.path("model-00001-of-00003.safetensors")));
  EXPECT_FALSE(Checkpoint::open(t.dir().string()).sharded());
}

// FileLoad::copy (ksa --no-mmap): the same tensors with the same bytes as the mapped files, across shards and
// across the 64 MiB pieces the copy reads (a 70.6 MB tensor), with the tensors' data outside the mapping.
TEST(Safetensors, CopiedCheckpointHoldsTheSameBytes) {
  test::TempDir t{"st"};
  SafetensorsWriter w;
  const std::vector<float> small = random_values(100, 21), big = random_values(4200 * 4200, 22);
  w.add("small", DType::f32, {10, 10}, small.data());
  w.add("big", DType::f32, {4200, 4200}, big.data());
  w.add("after", DType::f32, {10, 10}, small.data());
  w.write_checkpoint(t.dir().string(), 400 + 4200 * 4200 * 4);  // two shards: small + big, after
  const Checkpoint mapped = Checkpoint::open(t.dir().string());
  const Checkpoint copied = Checkpoint::open(t.dir().string(), FileLoad::copy);
  ASSERT_EQ(copied.files().size(), 2u);
  ASSERT_EQ(copied.tensors().size(), mapped.tensors().size());
  for (size_t i = 0; i < mapped.tensors().size(); ++i) {
    const TensorInfo &a = mapped.tensors()[i], &b = copied.tensors()[i];
    EXPECT_EQ(a.name, b.name);
    ASSERT_EQ(a.nbytes, b.nbytes) << a.name;
    EXPECT_NE(a.data, b.data) << a.name;
    EXPECT_EQ(std::memcmp(a.data, b.data, size_t(a.nbytes)), 0) << a.name;
  }
  EXPECT_EQ(copied.at("big").get(4200 * 4200 - 1), big.back());
}

// The writer ends every write but the last on a 2 MiB boundary of the file, passing only the bytes around
// the boundaries through a buffer: tensors just under, at and over 2 MiB, and one over a 16 MiB slice, read
// back equal, with the file exactly as long as header + data.
TEST(Safetensors, WriterKeepsEveryByteAcrossItsAlignedWrites) {
  test::TempDir t{"st"};
  SafetensorsWriter w;
  const int64_t mib2 = int64_t(1) << 19;  // f32 values in 2 MiB
  const std::vector<int64_t> sizes = {1, mib2 - 1, mib2, mib2 + 1, 3, 8 * mib2 + 5, 2 * mib2 - 7};
  std::vector<std::vector<float>> vals;
  for (size_t i = 0; i < sizes.size(); ++i) vals.push_back(random_values(sizes[i], 100 + i));
  for (size_t i = 0; i < sizes.size(); ++i) w.add("t" + std::to_string(i), DType::f32, {sizes[i]}, vals[i].data());
  const std::string path = (t.dir() / "model.safetensors").string();
  w.write_file(path);
  const Checkpoint c = Checkpoint::open(t.dir().string());
  int64_t data_bytes = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const TensorInfo& ti = c.at("t" + std::to_string(i));
    ASSERT_EQ(ti.nbytes, sizes[i] * 4);
    EXPECT_EQ(std::memcmp(ti.data, vals[i].data(), size_t(ti.nbytes)), 0) << ti.name;
    data_bytes += ti.nbytes;
  }
  std::ifstream f(path, std::ios::binary);
  uint64_t header = 0;
  f.read(reinterpret_cast<char*>(&header), 8);
  EXPECT_EQ(int64_t(std::filesystem::file_size(path)), 8 + int64_t(header) + data_bytes);
}

TEST(SafetensorsErrors, IndexProblems) {
  test::TempDir t{"st"};
  SafetensorsWriter w;
  const std::vector<float> v = random_values(4, 3);
  w.add("a", DType::f32, {4}, v.data());
  w.add("b", DType::f32, {4}, v.data());
  w.write_checkpoint(t.dir().string(), 16);
  const std::string idx = t.path("model.safetensors.index.json");
  const std::string d = t.dir().string();
  auto write_index = [&](const std::string& text) { std::ofstream(idx, std::ios::trunc) << text; };
  write_index(R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00003-of-00003.safetensors"}})");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            idx + ": weight_map names \"model-00003-of-00003.safetensors\", which does not exist in " + d);
  write_index(R"({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            t.path("model-00002-of-00002.safetensors") +
                ": has no tensor \"a\" (model.safetensors.index.json maps it there)");
  write_index(R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}})");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            t.path("model-00001-of-00002.safetensors") +
                ": has no tensor \"b\" (model.safetensors.index.json maps it there)");
  write_index(R"({"weight_map": {"a": "../secret.safetensors"}})");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            idx + ": weight_map.a: \"../secret.safetensors\" must be a plain file name in the checkpoint directory");
  write_index(R"({"metadata": {}})");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }), idx + ": weight_map: missing (required)");
  write_index(R"({"weight_map": )");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }).rfind(idx + ": invalid JSON: parse error at line 1", 0), 0u);
  fs::remove(idx);
  fs::remove(t.path("model-00001-of-00002.safetensors"));
  fs::remove(t.path("model-00002-of-00002.safetensors"));
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }), d + ": no model.safetensors or model.safetensors.index.json");
  EXPECT_EQ(error_of([&] { Checkpoint::open(d + "/missing"); }), d + "/missing: not a directory");
}

TEST(SafetensorsErrors, CorruptedFilesEachGiveTheirMessage) {
  test::TempDir t{"st"};
  const std::string p = t.path("bad.safetensors");
  auto open_err = [&] { return error_of([&] { SafetensorsFile::open(p); }); };

  std::ofstream(p, std::ios::binary | std::ios::trunc) << "abc";
  EXPECT_EQ(open_err(), p + ": file is 3 bytes, too short for the 8-byte header length");

  raw_file(p, "{}", 0, 0xFFFFFFFFFFFFFFFFull);
  EXPECT_EQ(open_err(), p + ": header length 18446744073709551615 exceeds the limit of 100000000 bytes");

  raw_file(p, "{}", 0, 5000);
  EXPECT_EQ(open_err(), p + ": header length 5000 runs past the end of the file (10 bytes)");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})", 8);  // truncated JSON
  EXPECT_EQ(open_err(),
            p + ": header is not valid JSON: parse error at line 1, column 61: syntax error while parsing object - "
                "unexpected end of input; expected '}'");

  raw_file(p, R"(["a"])", 0);
  EXPECT_EQ(open_err(), p + ": header must be a JSON object (got [\"a\"])");

  raw_file(
      p,
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
      12);
  EXPECT_EQ(open_err(), p + ": tensors \"a\" [0, 8) and \"b\" [4, 12) overlap");

  raw_file(p, R"({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}})", 16);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": dtype \"F64\" is not supported (BF16, F16 or F32; U8 as q8_0 weights)");

  raw_file(p, R"({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})", 10);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": shape [2, 3] of BF16 needs 12 bytes but data_offsets [0, 10] span 10");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8);
  EXPECT_EQ(open_err(),
            p + ": tensor \"a\": data_offsets [0, 16] run past the end of the data (8 bytes after the header)");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 8);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": data_offsets [8, 4] end before they begin");

  raw_file(
      p,
      R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
      8);
  EXPECT_EQ(open_err(), p + ": header names tensor \"a\" twice");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": shape must be a list of non-negative integers (got [-1])");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": data_offsets must be [begin, end], two non-negative integers (got [0])");

  raw_file(p, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}})", 4);
  EXPECT_EQ(open_err(), p + ": tensor \"a\": unknown field \"extra\"");

  raw_file(p, R"({"__metadata__": {"format": 3}})", 0);
  EXPECT_EQ(open_err(), p + ": __metadata__.format must be a string (got 3)");

  EXPECT_EQ(error_of([&] { SafetensorsFile::open(t.path("none.safetensors")); }),
            t.path("none.safetensors") + ": cannot open: No such file or directory");
  EXPECT_EQ(error_of([&] { SafetensorsFile::open(t.dir().string()); }), t.dir().string() + ": not a regular file");
}

// Issue #26: hostile headers end in a ksa::Error naming the file.
TEST(SafetensorsErrors, HostileHeaders) {
  test::TempDir t{"st_hostile"};
  const std::string p = t.path("bad.safetensors");
  auto open_err = [&] { return error_of([&] { SafetensorsFile::open(p); }); };
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  raw_file(p, "{\"a\": " + deep + "}", 0);  // the message's excerpt once overflowed the stack
  EXPECT_EQ(open_err(), p + ": header is not valid JSON: nested deeper than 100 levels (at byte 105)");
  raw_file(p, "{\"__metadata__\": " + deep + "}", 0);
  EXPECT_EQ(open_err(), p + ": header is not valid JSON: nested deeper than 100 levels (at byte 116)");
  raw_file(p, R"({"__metadata__": {"a": 1e309}})", 0);  // once escaped as nlohmann::json::out_of_range
  EXPECT_EQ(open_err(),
            p + ": header is not valid JSON: number overflow parsing '1e309' (a number must fit in a double)");
  raw_file(p, R"({"a": {"dtype": "F32", "shape": [1e309], "data_offsets": [0, 4]}})", 4);
  EXPECT_EQ(open_err(),
            p + ": header is not valid JSON: number overflow parsing '1e309' (a number must fit in a double)");

  // The index file goes through the same reader.
  const std::string d = t.path("ckpt");
  fs::create_directories(d);
  const std::string idx = d + "/model.safetensors.index.json";
  std::ofstream(idx) << "{\"weight_map\": " << deep << "}";
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            idx + ": invalid JSON: nested deeper than 100 levels (at byte 114)");
  std::ofstream(idx) << R"({"metadata": {"total_size": 1e999}, "weight_map": {}})";
  EXPECT_EQ(error_of([&] { Checkpoint::open(d); }),
            idx + ": invalid JSON: number overflow parsing '1e999' (a number must fit in a double)");
  // Found by fuzz_safetensors: a shard name longer than the system's limit made std::filesystem throw
  // filesystem_error ("File name too long") out of Checkpoint::open.
  const std::string long_name(300, 'a');
  std::ofstream(idx) << R"({"weight_map": {"x": ")" << long_name << R"("}})";
  EXPECT_EQ(error_of([&] {
              Checkpoint::open(d);
            }).rfind(idx + ": weight_map names \"" + long_name + "\", which cannot be read: ", 0),
            0u);
  const std::string long_dir = d + "/" + long_name;
  EXPECT_EQ(error_of([&] { Checkpoint::open(long_dir); }).rfind(long_dir + ": not a directory (", 0), 0u);
  EXPECT_EQ(error_of([&] { SafetensorsFile::open(long_dir); }).rfind(long_dir + ": cannot open: File name too long", 0),
            0u);
}

}  // namespace
}  // namespace ksa
