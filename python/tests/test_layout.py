"""The stream layout helpers (build_stream, stream_layout, stream_to_text, text_to_stream) against docs/ksa.md's
statement of the rule (§2 stream, §3 positions) written out independently here, and against themselves
(packed == one text at a time, the C++ inverse of the stream length)."""
import pytest
import torch

import ksa_torch


def spec_stream(T, k, S, tail, begin, tpos, spos):
    """docs/ksa.md (The stream, Positions) transcribed: (is_summary, text index or summary j, chunk, position) per
    stream row."""
    rows = []
    nch = (T + k - 1) // k
    for c in range(nch):
        a, n = c * k, min(k, T - c * k)
        for i in range(n):
            rows.append((False, a + i, c, a + i if tpos == "origin" else i))
        if n == k or tail:
            for j in range(S):
                if spos == "zeros":
                    p = 0
                elif spos == "last_chunk_slice_right":
                    p = max(a, a + ((j + 1) * n) // S - 1)
                else:
                    p = max(a, a + (j * n) // S - 1)
                rows.append((True, j, c, p))
    return rows


@pytest.mark.parametrize("k,S,tail", [(8, 1, False), (5, 2, True), (3, 3, False), (1, 1, True), (4, 3, True)])
@pytest.mark.parametrize("tpos", ["origin", "inner_chunk"])
@pytest.mark.parametrize("spos", ["zeros", "last_chunk_slice_left", "last_chunk_slice_right"])
def test_build_stream_matches_spec(k, S, tail, tpos, spos):
    begin = 1000
    gen = torch.Generator().manual_seed(k * 10 + S)
    for T in (0, 1, k - 1, k, k + 1, 3 * k, 37):
        T = max(T, 0)
        text = torch.randint(0, begin, (T,), generator=gen)
        st = ksa_torch.build_stream(text, k, S, summary_token_begin=begin, summarize_tail=tail,
                                    text_positions=tpos, summary_positions=spos)
        rows = spec_stream(T, k, S, tail, begin, tpos, spos)
        assert st.input_ids.tolist() == [begin + x if s else int(text[x]) for s, x, _, _ in rows]
        assert st.position_ids.tolist() == [p for *_, p in rows]
        assert st.is_summary.tolist() == [s for s, *_ in rows]
        assert st.cu_seqlens.tolist() == [0, len(rows)] and st.max_seqlen == len(rows)
        assert torch.equal(st.input_ids[st.text_rows], text)
        assert ksa_torch.text_length_of_stream(k, S, len(rows), tail) == T


def test_packed_equals_one_text_at_a_time():
    k, S = 8, 1
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 5, 8, 17, 0, 100, 1]
    text = torch.randint(0, 500, (sum(lengths),), generator=gen)
    cu_text = torch.tensor([0] + lengths).cumsum(0)
    st = ksa_torch.build_stream(text, k, S, cu_seqlens=cu_text, summary_token_begin=500, summarize_tail=True)
    parts = [ksa_torch.build_stream(text[a:b], k, S, summary_token_begin=500, summarize_tail=True)
             for a, b in zip(cu_text.tolist(), cu_text.tolist()[1:])]
    assert torch.equal(st.input_ids, torch.cat([p.input_ids for p in parts]))
    assert torch.equal(st.position_ids, torch.cat([p.position_ids for p in parts]))  # positions restart per text
    assert torch.equal(st.is_summary, torch.cat([p.is_summary for p in parts]))
    assert st.cu_seqlens.dtype == torch.int32
    assert st.cu_seqlens.diff().tolist() == [int(p.cu_seqlens[-1]) for p in parts]
    assert st.max_seqlen == max(int(p.cu_seqlens[-1]) for p in parts)
    assert torch.equal(st.input_ids[st.text_rows], text)
    lay = ksa_torch.stream_layout(lengths, k, S, summarize_tail=True)
    assert lay.input_ids is None
    for a, b in ((lay.position_ids, st.position_ids), (lay.is_summary, st.is_summary), (lay.text_rows, st.text_rows),
                 (lay.cu_seqlens, st.cu_seqlens)):
        assert torch.equal(a, b)


def test_batched_text_and_gather_scatter():
    k, S = 4, 1
    text = torch.arange(2 * 10).view(2, 10)
    st = ksa_torch.build_stream(text, k, S, summary_token_begin=99)
    L = 10 + 2
    assert st.input_ids.shape == (2, L) and st.position_ids.shape == (2, L)
    assert torch.equal(st.input_ids[1, st.text_rows], text[1])
    # Gather/scatter round trip, with gradients.
    x = torch.randn(2, 10, 3, requires_grad=True)
    s = ksa_torch.text_to_stream(x, st, dim=1, fill=-1.0)
    assert s.shape == (2, L, 3)
    assert torch.equal(s[:, st.is_summary], torch.full((2, 2, 3), -1.0))
    back = ksa_torch.stream_to_text(s, st, dim=1)
    assert torch.equal(back, x)
    back.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_layout_errors():
    with pytest.raises(ValueError, match="cu_seqlens"):
        ksa_torch.build_stream(torch.arange(10), 8, 1, cu_seqlens=[0, 4, 9])
    with pytest.raises(RuntimeError, match="summary_positions"):
        ksa_torch.stream_layout([5], 8, 1, summary_positions="middle")
    with pytest.raises(RuntimeError, match="chunk_size \\(summary_chunk_size\\)"):
        ksa_torch.stream_layout([5], 0, 1)
