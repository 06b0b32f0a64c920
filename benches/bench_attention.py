"""Attention over a packed sequence on this machine, forward + backward, with the kernels stic calls (libtorch's
`scaled_dot_product_attention`, the same library as this torch): one call with a block mask over the whole
sequence against one fused call per segment (what `src/model/attention.rs` does), and the padded batch of the rows
as a baseline. Shapes of bench-train's CPU model (8 heads, 2 key/value heads, head_dim 128). Prints seconds (best
of --repeats) per layout.

    .venv/bin/python benches/bench_attention.py
"""
import argparse
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 128
# (name, segments as (length, parent index or None)): a DPO pair (prompt, chosen, rejected), two pairs, SFT rows
LAYOUTS = [
    ("DPO, 1 pair: prompt 2200 + responses 320, 310", [(2200, None), (320, 0), (310, 0)]),
    ("DPO, 2 pairs", [(2200, None), (320, 0), (310, 0), (1600, None), (200, 3), (90, 3)]),
    ("SFT, 4 rows of 2048, 1900, 1200, 800", [(2048, None), (1900, None), (1200, None), (800, None)]),
]


def layout(segments):
    """Start of each segment, the chain of segments of each, and every token's position in its row."""
    starts, offsets = [], []
    for length, parent in segments:
        starts.append(sum(s for s, _ in segments[: len(starts)]))
        offsets.append(0 if parent is None else offsets[parent] + segments[parent][0])
    chains = []
    for i, (_, parent) in enumerate(segments):
        chains.append((chains[parent] if parent is not None else []) + [i])
    return starts, offsets, chains


def block_mask(segments):
    starts, _, chains = layout(segments)
    n = sum(s for s, _ in segments)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, (length, _) in enumerate(segments):
        keys = torch.cat([torch.arange(starts[c], starts[c] + segments[c][0]) for c in chains[i]])
        visible = torch.ones(length, len(keys), dtype=torch.bool).tril(len(keys) - length)
        mask[starts[i]: starts[i] + length, keys] = visible
    return mask[None, None]


def packed_inputs(n):
    return [torch.randn(1, h, n, HEAD_DIM, requires_grad=True) for h in (HEADS, KV_HEADS, KV_HEADS)]


def one_call(segments):
    mask = block_mask(segments)
    q, k, v = packed_inputs(mask.shape[-1])
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()


def per_segment(segments):
    starts, offsets, chains = layout(segments)
    q, k, v = packed_inputs(sum(s for s, _ in segments))
    calls = []
    for i, (length, _) in enumerate(segments):
        keys = torch.cat([torch.arange(starts[c], starts[c] + segments[c][0]) for c in chains[i]])
        mask = None if offsets[i] == 0 else torch.ones(length, len(keys), dtype=torch.bool).tril(offsets[i])[None, None]
        calls.append((starts[i], length, keys, mask))

    def run():
        outs = [F.scaled_dot_product_attention(q[:, :, s:s + n], k[:, :, keys], v[:, :, keys], attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=True) for s, n, keys, mask in calls]
        torch.cat(outs, 2).sum().backward()
    return run


def padded(segments):
    _, offsets, chains = layout(segments)
    leaves = [i for i in range(len(segments)) if all(i not in c[:-1] for c in chains)]
    t = max(offsets[i] + segments[i][0] for i in leaves)
    q, k, v = (torch.randn(len(leaves), h, t, HEAD_DIM, requires_grad=True) for h in (HEADS, KV_HEADS, KV_HEADS))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()


def best(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds, forward + backward")
    print(f"{'':44}{'block mask':>12}{'per segment':>13}{'padded rows':>13}")
    for name, segments in LAYOUTS:
        times = [best(make(segments), args.repeats) for make in (one_call, per_segment, padded)]
        print(f"{name:44}" + "".join(f"{t:12.3f} " for t in times))


if __name__ == "__main__":
    main()
