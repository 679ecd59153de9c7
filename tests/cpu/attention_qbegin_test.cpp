// AttentionParams::q_begin on the CPU: a call that computes only the query rows from q_begin on must give,
// bit for bit, those rows of the full call (forward), and the full call's dk, dv and dq rows when the rows
// before q_begin carry no gradient (backward: their dout is zero in the full call). The rows before q_begin
// of q, out, lse and dout hold NaN in the q_begin call, so reading one would show; out, lse and dq there must
// stay as they were (the binding's views start q_begin rows before their memory).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "attention_cases.hpp"
#include "ksa/cpu.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

using test::Case;
using test::Problem;

// Sets element (b, row, h, :) of a view to x, for rows [r0, r1).
void fill_rows(Problem& pr, const TensorView& t, int64_t H, int64_t r0, int64_t r1, float x) {
  for (int64_t b = 0; b < pr.c.B; ++b)
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < pr.c.D; ++d) store_from_float(pr.c.dtype, t.data, t.offset(b, i, h) + d, x);
}

// Same bits of element (b, row, h, :) for rows [r0, r1) of two views (NaN never equals).
void expect_rows_equal(const char* what, const Problem& a, const TensorView& ta, const Problem& b, const TensorView& tb,
                       int64_t H, int64_t r0, int64_t r1, int64_t qb) {
  for (int64_t bb = 0; bb < a.c.B; ++bb)
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < a.c.D; ++d) {
          const float x = a.at(ta, bb, i, h, d), y = b.at(tb, bb, i, h, d);
          ASSERT_TRUE(x == y || (std::isnan(x) && std::isnan(y) && r0 == 0 && i < qb && std::strcmp(what, "dq") == 0))
              << what << " [b=" << bb << ", row=" << i << ", h=" << h << ", d=" << d << "]: full " << x << ", q_begin "
              << y << " (q_begin " << qb << ", " << a.c.str() << ")";
        }
}

void check(const Case& c, int64_t qb) {
  SCOPED_TRACE(testing::Message() << c.str() << " q_begin=" << qb);
  Problem full(c), part(c);  // the same seed: the same q, k, v, dout
  ASSERT_LE(qb, full.L);
  // The full call: every row; dout zero before qb.
  fill_rows(full, full.p.dout, c.Hq, 0, qb, 0.f);
  cpu::attention_forward(full.p);
  cpu::attention_backward(full.p);
  // The q_begin call: NaN in every row before qb that it must not read; dq there is NaN and must stay so.
  part.p.q_begin = qb;
  fill_rows(part, part.p.q, c.Hq, 0, qb, NAN);
  fill_rows(part, part.p.dout, c.Hq, 0, qb, NAN);
  fill_rows(part, part.p.out, c.Hq, 0, qb, NAN);
  fill_rows(part, part.p.dq, c.Hq, 0, qb, NAN);
  cpu::attention_forward(part.p);
  for (int64_t b = 0; b < c.B; ++b)  // nothing written before qb (lse starts as NaN: Problem)
    for (int64_t i = 0; i < qb; ++i)
      for (int64_t h = 0; h < c.Hq; ++h) {
        ASSERT_TRUE(std::isnan(part.lse[size_t((b * part.L + i) * c.Hq + h)])) << "lse row " << i << " written";
        ASSERT_TRUE(std::isnan(part.at(part.p.out, b, i, h, 0))) << "out row " << i << " written";
      }
  cpu::attention_backward(part.p);

  expect_rows_equal("out", full, full.p.out, part, part.p.out, c.Hq, qb, full.L, qb);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = qb; i < full.L; ++i)
      for (int64_t h = 0; h < c.Hq; ++h) {
        const size_t at = size_t((b * full.L + i) * c.Hq + h);
        ASSERT_EQ(full.lse[at], part.lse[at]) << "lse [b=" << b << ", row=" << i << ", h=" << h << "]";
      }
  expect_rows_equal("dq", full, full.p.dq, part, part.p.dq, c.Hq, qb, full.L, qb);
  for (int64_t b = 0; b < c.B; ++b)  // untouched before qb
    for (int64_t i = 0; i < qb; ++i)
      ASSERT_TRUE(std::isnan(part.at(part.p.dq, b, i, 0, 0))) << "dq row " << i << " written";
  expect_rows_equal("dk", full, full.p.dk, part, part.p.dk, c.Hkv, 0, full.L, qb);
  expect_rows_equal("dv", full, full.p.dv, part, part.p.dv, c.Hkv, 0, full.L, qb);
}

TEST(CpuQBegin, EqualsTheFullCallsRows) {
  uint64_t seed = 8000;
  const Case cases[] = {
      Case::of(8, 1, 300, 2, false, 1, 4, 2, 64, DType::f32, false),
      Case::of(8, 2, 97, 3, true, 2, 2, 1, 48, DType::f32, true),  // ends in a summarised partial chunk
      Case::of(5, 2, 240, 100, true, 1, 2, 2, 32, DType::bf16, true),
      Case::of(4, 1, 150, 0, false, 1, 8, 1, 80, DType::f32, false, 0.2f),
  };
  for (Case c : cases) {
    c.seed = ++seed;
    const Layout lay(c.k, c.S, c.T, c.tail);
    const int64_t L = lay.length(), ck = c.k + c.S;
    // The first row, inside a chunk's text, a chunk's first and second summary, a tile boundary (64), inside
    // the tail's summaries, the last row, and L itself (nothing to compute).
    for (int64_t qb : {int64_t(0), int64_t(1), 3 * ck + 2, 2 * ck + c.k, 2 * ck + c.k + 1, int64_t(64), int64_t(65),
                       L - c.S, L - 1, L}) {
      if (qb < 0 || qb > L) continue;
      check(c, qb);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(CpuQBegin, RejectedWithPackedSequences) {
  Case c;
  Problem pr(c);
  const int64_t cu[2] = {0, pr.L};
  pr.p.cu_seqlens = cu;
  pr.p.num_seqs = 1;
  pr.p.q_begin = 1;
  EXPECT_THROW(cpu::attention_forward(pr.p), Error);
  EXPECT_THROW(cpu::attention_backward(pr.p), Error);
  pr.p.cu_seqlens = nullptr;
  pr.p.num_seqs = 0;
  pr.p.q_begin = pr.L + 1;
  EXPECT_THROW(cpu::attention_forward(pr.p), Error);
}

}  // namespace
}  // namespace ksa
