// 8-bit weights for a whole checkpoint (`ksa quantize`, docs/quantization.md): every weight matrix of the
// weight table (q/k/v/o, the summary projections, gate/up/down, the token embeddings, lm_head) whose K is a
// multiple of 32 is written as Q8_0 blocks (U8 [N, K/32, 34], "ksa.quantization": "q8_0" in every file's
// __metadata__); norms, other vectors and matrices with K % 32 != 0 are copied unchanged. The token
// embeddings are quantised too: the CPU engine dequantises the rows it looks up (one row is K/32 whole
// blocks), and a tied lm_head is the same tensor.
//
// Memory: the input is memory-mapped and the output written tensor by tensor, in slices of at most 16 MiB
// (the fp32 values of one slice are converted a few thousand blocks at a time); no whole tensor, let alone
// the model, is held in fp32, and a tensor's mapped pages are released once it is written.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ksa/dtype.hpp"

namespace ksa {

// One tensor as written (passed to QuantizeOptions::progress after its last byte).
struct QuantizedTensor {
  std::string name;
  std::vector<int64_t> shape;  // the matrix [N, K] for q8_0
  DType from = DType::bf16, to = DType::bf16;
  int64_t bytes_in = 0, bytes_out = 0;
  int64_t index = 0, count = 0;  // its place among the checkpoint's tensors (0-based), and their number
  std::string kept_because;      // a matrix left unquantised: why ("K = 48 is not a multiple of 32")
};

struct QuantizeOptions {
  std::string type = "q8_0";                   // the only type so far
  int64_t max_shard_bytes = int64_t(4) << 30;  // larger outputs are sharded
  std::function<void(const QuantizedTensor&)> progress;
};

struct QuantizeReport {
  int64_t tensors = 0, quantized = 0;
  int64_t bytes_in = 0, bytes_out = 0;                // tensor bytes of the whole checkpoint
  int64_t matrix_bytes_in = 0, matrix_bytes_out = 0;  // of the tensors quantised
  std::vector<std::string> kept;                      // matrices left unquantised, "name: why"
  std::vector<std::string> files;                     // safetensors (and index) written
  std::vector<std::string> copied;                    // other files copied (config.json, tokenizer files, ...)
};

// Reads the checkpoint in `in_dir` (config.json + safetensors, single or sharded; checked against the weight
// table first), writes the quantised one into `out_dir` (created; an earlier checkpoint there is replaced)
// and copies every other regular file of `in_dir` except weights (*.safetensors, their index, *.bin, *.pt,
// *.pth, *.gguf). Throws ksa::Error: an unknown type, out_dir the same directory as in_dir, a checkpoint
// already quantised, or whatever reading and writing meet.
QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir,
                                   const QuantizeOptions& opt = {});

}  // namespace ksa
