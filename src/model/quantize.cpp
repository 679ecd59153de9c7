// 8-bit weights for a whole checkpoint (see ksa/quantize.hpp).
#include "ksa/quantize.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include "ksa/dense.hpp"
#include "ksa/error.hpp"
#include "ksa/model_config.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/weights.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;

// Weights in any format: not copied next to the quantised safetensors.
bool is_weight_file(const std::string& name) {
  auto ends = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return name == Checkpoint::kIndexFile || ends(".safetensors") || ends(".bin") || ends(".pt") || ends(".pth") ||
         ends(".gguf");
}

// Blocks [first, first + n) of the matrix t (row-major, K a multiple of 32, so a block never spans two rows)
// as Q8_0 into dst, a few thousand blocks of fp32 at a time.
void quantize_blocks(const TensorInfo& t, int64_t first, int64_t n, std::byte* dst) {
  constexpr int64_t kChunk = 4096;  // blocks: 512 KiB of fp32
  std::vector<float> buf(size_t(std::min(n, kChunk) * kQ8_0Block));
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t cnt = std::min(kChunk, n - b), e0 = (first + b) * kQ8_0Block;
    for (int64_t i = 0; i < cnt * kQ8_0Block; ++i) {
      const float x = t.get(e0 + i);
      if (!std::isfinite(x))
        fail(t.file, ": tensor \"", t.name, "\" element ", e0 + i, " (row ", (e0 + i) / t.shape[1], ") is ", x,
             ": a non-finite weight cannot be quantised");
      buf[size_t(i)] = x;
    }
    cpu::quantize_q8_0(buf.data(), cnt * kQ8_0Block, dst + b * kQ8_0BlockBytes);
  }
}

// The input is mapped read-only: once a tensor is written, its whole pages are dropped from this process
// (they are re-read from the file if ever touched again), so that the resident set stays near one tensor
// instead of growing to the input's size. Advice only: a failure changes nothing.
void drop_pages(const TensorInfo& t) {
  const auto page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t b = (reinterpret_cast<uintptr_t>(t.data) + page - 1) / page * page;
  const uintptr_t e = (reinterpret_cast<uintptr_t>(t.data) + uintptr_t(t.nbytes)) / page * page;
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

}  // namespace

QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, const QuantizeOptions& opt) {
  if (opt.type != "q8_0") fail("quantize: type \"", opt.type, "\" is not supported (q8_0)");
  if (opt.max_shard_bytes < 1) fail("quantize: max_shard_bytes must be >= 1 (got ", opt.max_shard_bytes, ")");
  const ModelConfig cfg = ModelConfig::load(in_dir);
  const Checkpoint ckpt = Checkpoint::open(in_dir);
  check_weights(cfg, ckpt);  // only what the engine loads: the table says which tensors are matrices
  for (const TensorInfo& t : ckpt.tensors())
    if (t.dtype == DType::q8_0) fail(in_dir, ": already quantised (", t.name, " is q8_0)");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) fail(out_dir, ": cannot create the directory: ", ec.message());
  if (fs::equivalent(in_dir, out_dir, ec))
    fail(out_dir, ": is the input checkpoint's directory; write the quantised checkpoint into another one");

  std::set<std::string> matrices;  // the table's tensors that may be q8_0
  for (const ExpectedTensor& e : expected_tensors(cfg))
    if ((e.dtypes & dtype_bit(DType::q8_0)) && e.shape.size() == 2) matrices.insert(e.name);

  SafetensorsWriter w;
  for (const SafetensorsFile& f : ckpt.files())
    for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);  // e.g. "format": "pt"
  QuantizeReport rep;
  const int64_t count = int64_t(ckpt.tensors().size());
  for (const TensorInfo& t : ckpt.tensors()) {
    QuantizedTensor q;
    q.name = t.name;
    q.shape = t.shape;
    q.from = q.to = t.dtype;
    q.bytes_in = q.bytes_out = t.nbytes;
    q.index = rep.tensors++;
    q.count = count;
    const bool matrix = matrices.count(t.name) > 0;
    if (matrix && t.shape[1] % kQ8_0Block != 0) {
      q.kept_because = "K = " + std::to_string(t.shape[1]) + " is not a multiple of " + std::to_string(kQ8_0Block);
      rep.kept.push_back(t.name + ": " + q.kept_because);
    }
    const TensorInfo* src = &t;  // lives as long as ckpt, i.e. through write_checkpoint below
    const QuantizeOptions* o = &opt;
    if (matrix && q.kept_because.empty()) {
      q.to = DType::q8_0;
      q.bytes_out = dtype_bytes(DType::q8_0, t.numel());
      const int64_t blocks = t.numel() / kQ8_0Block;
      ++rep.quantized;
      rep.matrix_bytes_in += q.bytes_in;
      rep.matrix_bytes_out += q.bytes_out;
      w.add(t.name, DType::q8_0, t.shape, [src, q, blocks, o](int64_t first, int64_t n, void* dst) {
        quantize_blocks(*src, first, n, static_cast<std::byte*>(dst));
        if (first + n < blocks) return;
        drop_pages(*src);
        if (o->progress) o->progress(q);
      });
    } else {
      const int64_t item = dtype_size(t.dtype), units = t.numel();
      w.add(t.name, t.dtype, t.shape, [src, q, item, units, o](int64_t first, int64_t n, void* dst) {
        std::memcpy(dst, src->data + first * item, size_t(n * item));
        if (first + n < units) return;
        drop_pages(*src);
        if (o->progress) o->progress(q);
      });
    }
    rep.bytes_in += q.bytes_in;
    rep.bytes_out += q.bytes_out;
  }
  rep.files = w.write_checkpoint(out_dir, opt.max_shard_bytes);

  fs::directory_iterator files(in_dir, ec);
  if (ec) fail(in_dir, ": cannot list the directory: ", ec.message());
  for (const fs::directory_entry& de : files) {
    const std::string name = de.path().filename().string();
    if (!de.is_regular_file(ec) || is_weight_file(name)) continue;
    fs::copy_file(de.path(), fs::path(out_dir) / name, fs::copy_options::overwrite_existing, ec);
    if (ec) fail((fs::path(out_dir) / name).string(), ": cannot copy from ", de.path().string(), ": ", ec.message());
    rep.copied.push_back(name);
  }
  std::sort(rep.copied.begin(), rep.copied.end());
  return rep;
}

}  // namespace ksa
