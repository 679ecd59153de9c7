// Shared by the cache tests: random whole-stream q/k/v for one sequence with its oracle output, and a driver
// that prefills a cache with a prefix of each stream and decodes the rest through ksa::cpu::attention_decode,
// checking every decoded row against the oracle.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "ksa/cache.hpp"
#include "ksa/cpu.hpp"
#include "ksa/decode.hpp"
#include "ksa/error.hpp"

namespace ksa::test {

// One sequence: q [L, Hq, D], k and v [L, Hkv, D] of the whole stream, random normal values stored in the
// dtype (so bf16 data is already bf16-rounded), and the oracle's output for the stream positions
// [ref_from, L) (all by default; long streams check only their end).
struct SeqData {
  Layout lay;
  int64_t L = 0, Hq = 1, Hkv = 1, D = 1, W = 0, ref_from = 0;
  DType dtype = DType::f32;
  std::vector<uint8_t> q, k, v;
  cpu::ReferenceOutput ref;
  double vmax = 0;  // max |v|

  SeqData(const Spec& spec, int64_t T, int64_t hq, int64_t hkv, int64_t d, DType dt, std::mt19937_64& rng,
          int64_t last_rows = -1)
      : lay(Layout::of(spec, T)),
        L(lay.length()),
        Hq(hq),
        Hkv(hkv),
        D(d),
        W(spec.W),
        ref_from(last_rows < 0 ? 0 : std::max<int64_t>(0, lay.length() - last_rows)),
        dtype(dt) {
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](std::vector<uint8_t>& b, int64_t H) {
      b.resize(size_t(L * H * D * dtype_size(dtype)));
      for (int64_t i = 0; i < L * H * D; ++i) store_from_float(dtype, b.data(), i, nd(rng));
    };
    fill(q, Hq);
    fill(k, Hkv);
    fill(v, Hkv);
    for (int64_t i = 0; i < L * Hkv * D; ++i)
      vmax = std::max(vmax, double(std::abs(load_as_float(dtype, v.data(), i))));
    std::vector<int64_t> rows;
    for (int64_t p = ref_from; p < L; ++p) rows.push_back(p);
    if (L > 0) ref = cpu::attention_reference(params(), rows);
  }

  AttentionParams params() const {
    // out = q: unused by the oracle.
    return dense_params(lay, W, 1, Hq, Hkv, D, dtype, {q.data(), k.data(), v.data(), const_cast<uint8_t*>(q.data())});
  }
  // Stream rows [p0, p0 + n) of k or v as cache input.
  KvRows rows(const std::vector<uint8_t>& b, int64_t p0, int64_t n) const {
    return KvRows::dense(b.data() + p0 * Hkv * D * dtype_size(dtype), n, Hkv, D, dtype);
  }
};

// Tolerances against the double-precision oracle on the same (already dtype-rounded) inputs. The cache
// stores K/V bit for bit (bf16 inputs into a bf16 cache are exact), so the only differences are fp32 math
// and, for bf16, the final rounding of out. fp32: scores |q.k| scale carry a relative error of about
// D·eps, the softmax and the sum over keys a few eps more; on unit-normal data that stays below 2e-6·max|v|
// for D <= 128 and a few hundred keys, so 1e-5·(1 + max|v|) is five times that and still far below any
// error a wrong key set makes (~0.1). bf16 out: one rounding, at most 2^-8 relative (half an ulp; bf16 keeps
// 8 significant bits), plus the fp32 bound. lse is fp32 in both: 2e-5·(1 + |lse|).
inline double out_tol(DType t, double ref, double vmax) {
  const double f32 = 1e-5 * (1.0 + vmax);
  return t == DType::f32 ? f32 : std::ldexp(std::abs(ref), -8) + f32;
}
inline double lse_tol(double ref) { return 2e-5 * (1.0 + std::abs(ref)); }

// The sequences a decode driver (Driver below, GpuDriver in tests/cuda) runs, and the check of each step's rows.
struct DecodeTracker {
  std::vector<const SeqData*> data;  // owned by the test
  std::vector<SeqId> ids;
  std::vector<int64_t> pos;             // stream tokens already in the cache, per sequence
  double worst_out = 0, worst_lse = 0;  // worst error / tolerance seen
  int64_t checked = 0;

  bool done(size_t i) const { return pos[i] == data[i]->L; }

  // The cache ids of a step's sequences (batch[j], n[j] new tokens each); put(r, d, p) copies stream token p
  // of sequence data d into the step's row r (rows in batch order).
  template <class Put>
  std::vector<SeqId> gather_step(const std::vector<size_t>& batch, const std::vector<int64_t>& n, Put put) const {
    std::vector<SeqId> bid;
    int64_t r = 0;
    for (size_t j = 0; j < batch.size(); ++j) {
      bid.push_back(ids[batch[j]]);
      for (int64_t i = 0; i < n[j]; ++i, ++r) put(r, *data[batch[j]], pos[batch[j]] + i);
    }
    return bid;
  }

  // Checks a decode step's rows against the oracle and advances pos: the step's row r is token i of sequence
  // batch[j] (sequences in batch order, n[j] tokens each). out: host copy of the step's output, dtype dt, with
  // the row and head strides of `ov`; lse: [rows, Hq]. Tolerances: out_tol(d, ref), lse_tol(ref). False, with
  // a failure, at the first mismatch.
  template <class OutTol, class LseTol>
  bool check_step(const std::vector<size_t>& batch, const std::vector<int64_t>& n, DType dt, const void* out,
                  const TensorView& ov, const float* lse, OutTol out_tol, LseTol lse_tol) {
    int64_t r = 0;
    for (size_t j = 0; j < batch.size(); ++j) {
      const SeqData& d = *data[batch[j]];
      const int64_t Hq = d.Hq, D = d.D;
      for (int64_t i = 0; i < n[j]; ++i, ++r) {
        const int64_t p = pos[batch[j]] + i;
        for (int64_t h = 0; h < Hq; ++h) {
          for (int64_t e = 0; e < D; ++e) {
            const double got = load_as_float(dt, out, r * ov.row_stride + h * ov.head_stride + e);
            const double ref = d.ref.out[size_t(((p - d.ref_from) * Hq + h) * D + e)];
            const double err = std::abs(got - ref), tol = out_tol(d, ref);
            worst_out = std::max(worst_out, std::isnan(err) ? INFINITY : err / tol);
            if (!(err <= tol)) {
              ADD_FAILURE() << "out mismatch: sequence " << batch[j] << " stream position " << p << " ("
                            << (d.lay.is_summary(p) ? "summary" : "text") << ") head " << h << " dim " << e << ": got "
                            << got << ", oracle " << ref << ", |err| " << err << " > tol " << tol << " (step of "
                            << n[j] << " tokens, token " << i << ")";
              return false;
            }
          }
          const double gl = lse[size_t(r * Hq + h)], rl = d.ref.lse[size_t((p - d.ref_from) * Hq + h)];
          const double el = std::abs(gl - rl), tl = lse_tol(rl);
          worst_lse = std::max(worst_lse, std::isnan(el) ? INFINITY : el / tl);
          if (!(el <= tl)) {
            ADD_FAILURE() << "lse mismatch: sequence " << batch[j] << " stream position " << p << " head " << h
                          << ": got " << gl << ", oracle " << rl;
            return false;
          }
        }
        ++checked;
      }
      pos[batch[j]] += n[j];
    }
    return true;
  }
};

// Drives a cache through prefill and decode steps for several sequences and checks each decoded row.
struct Driver : DecodeTracker {
  KvCache cache;
  bool strided = false;  // pack q/k/v/out with padded heads and rows
  int threads = 0;

  explicit Driver(const KvCacheConfig& cfg) : cache(cfg) {}

  void add(const SeqData& d) {
    data.push_back(&d);
    ids.push_back(cache.add_sequence());
    pos.push_back(0);
  }

  void prefill(size_t i, int64_t n) {
    cache.prefill(ids[i], data[i]->rows(data[i]->k, pos[i], n), data[i]->rows(data[i]->v, pos[i], n));
    pos[i] += n;
  }

  // The next n stream tokens of sequence i through append_text / append_summaries (summaries in random
  // groups), as a decoder that computes K/V elsewhere would fill the cache.
  void append_tokens(size_t i, int64_t n, std::mt19937_64& rng) {
    const SeqData& d = *data[i];
    for (int64_t end = pos[i] + n; pos[i] < end;) {
      const int64_t due = cache.state(ids[i]).pending_summaries;
      if (due == 0) {
        cache.append_text(ids[i], d.rows(d.k, pos[i], 1), d.rows(d.v, pos[i], 1));
        ++pos[i];
      } else {
        const int64_t m = std::uniform_int_distribution<int64_t>(1, std::min(due, end - pos[i]))(rng);
        cache.append_summaries(ids[i], d.rows(d.k, pos[i], m), d.rows(d.v, pos[i], m));
        pos[i] += m;
      }
    }
  }

  // One decode step: n[j] new tokens for sequence batch[j].
  void step(const std::vector<size_t>& batch, const std::vector<int64_t>& n) {
    const SeqData& d0 = *data[batch.at(0)];
    const int64_t Hq = d0.Hq, Hkv = d0.Hkv, D = d0.D, es = dtype_size(d0.dtype);
    int64_t R = 0;
    for (int64_t x : n) R += x;
    const int64_t hp = strided ? 3 : 0, rp = strided ? 5 : 0;
    auto view = [&](std::vector<uint8_t>& b, int64_t H) {
      const int64_t hs = D + hp, rs = H * hs + rp;
      b.assign(size_t(std::max<int64_t>(R, 1) * rs * es), 0xff);  // NaN padding: read by mistake, it shows
      return TensorView{b.data(), 0, rs, hs};
    };
    std::vector<uint8_t> qb, kb, vb, ob;
    DecodeIO io;
    io.Hq = Hq;
    io.dtype = d0.dtype;
    io.q = view(qb, Hq);
    io.k = view(kb, Hkv);
    io.v = view(vb, Hkv);
    io.out = view(ob, Hq);
    std::vector<float> lse(size_t(R * Hq), NAN);
    io.lse = lse.data();
    io.num_threads = threads;
    auto put = [&](const TensorView& t, int64_t row, const std::vector<uint8_t>& src, int64_t srow, int64_t H) {
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(static_cast<uint8_t*>(t.data) + (row * t.row_stride + h * t.head_stride) * es,
                    src.data() + (srow * H + h) * D * es, size_t(D * es));
    };
    const std::vector<SeqId> bid = gather_step(batch, n, [&](int64_t r, const SeqData& d, int64_t p) {
      put(io.q, r, d.q, p, Hq);
      put(io.k, r, d.k, p, Hkv);
      put(io.v, r, d.v, p, Hkv);
    });
    cpu::attention_decode(cache, bid, n, io);
    check_step(
        batch, n, d0.dtype, io.out.data, io.out, lse.data(),
        [](const SeqData& d, double ref) { return out_tol(d.dtype, ref, d.vmax); }, lse_tol);
  }
};

// After the prefills (splits[i] tokens of sequence i), decodes every sequence to its end in random batches (a
// random subset of the unfinished sequences per step) of one token each or, with pieces, 0..max_piece tokens
// (at most what is left), then expects every decoded row to have been checked. False when a step failed (it
// stops there). Drv: the CPU Driver or its GPU twin (pos, checked, done(i), step(batch, n)).
template <class Drv>
bool decode_to_end(Drv& drv, const std::vector<SeqData>& seqs, const std::vector<int64_t>& splits, bool pieces,
                   int64_t max_piece, std::mt19937_64& rng) {
  for (int guard = 0; guard < 100000; ++guard) {
    std::vector<size_t> open;
    for (size_t i = 0; i < seqs.size(); ++i)
      if (!drv.done(i)) open.push_back(i);
    if (open.empty()) break;
    std::shuffle(open.begin(), open.end(), rng);
    const size_t nb = std::uniform_int_distribution<size_t>(1, open.size())(rng);
    std::vector<size_t> batch(open.begin(), open.begin() + nb);
    std::vector<int64_t> n;
    for (size_t i : batch) {
      const int64_t left = seqs[i].L - drv.pos[i];
      n.push_back(pieces ? std::min(left, std::uniform_int_distribution<int64_t>(0, max_piece)(rng)) : 1);
    }
    drv.step(batch, n);
    if (::testing::Test::HasFailure()) return false;
  }
  int64_t rows = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_TRUE(drv.done(i));
    rows += seqs[i].L - splits[i];
  }
  EXPECT_EQ(drv.checked, rows) << "every decoded row is checked";
  return true;
}

}  // namespace ksa::test
