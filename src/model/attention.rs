//! Attention over packed sequences: rows laid end to end in one sequence (batch 1) without padding, where a row
//! may continue a segment that other rows continue too (the common prompt of a preference pair). A segment's
//! queries see their own keys causally and every key of the segments it continues; the fused kernel runs once per
//! segment, so no work goes to pairs of tokens that may not see each other (a block-diagonal mask over the whole
//! sequence costs the full square: measured 1.3–2.8× slower on CPU, see the README).
use tch::{Device, Kind, Tensor};

/// A run of tokens of the packed sequence; `parent` is the segment it continues (earlier in the sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub len: i64,
    pub parent: Option<usize>,
}

/// Where the segments lie: the packed index of each segment's first token, and its first position in its row.
#[derive(Debug, Clone)]
pub struct SegmentLayout {
    segments: Vec<Segment>,
    starts: Vec<i64>,
    offsets: Vec<i64>,
}

impl SegmentLayout {
    /// Segments in sequence order; a parent comes before its children.
    pub fn new(segments: Vec<Segment>) -> Self {
        let (mut starts, mut offsets) = (Vec::with_capacity(segments.len()), Vec::with_capacity(segments.len()));
        let mut next = 0;
        for (i, s) in segments.iter().enumerate() {
            assert!(s.parent.is_none_or(|p| p < i), "a segment continues a later one");
            starts.push(next);
            offsets.push(s.parent.map_or(0, |p| offsets[p] + segments[p].len));
            next += s.len;
        }
        SegmentLayout { segments, starts, offsets }
    }

    pub fn len(&self) -> i64 {
        self.starts.last().map_or(0, |s| s + self.segments.last().expect("segment").len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The packed index of the first token of segment `s`.
    pub fn start(&self, s: usize) -> i64 {
        self.starts[s]
    }

    /// The position (in its row) of every packed token, for the rotary embeddings.
    pub fn positions(&self) -> Vec<i64> {
        self.segments.iter().zip(&self.offsets).flat_map(|(s, &o)| o..o + s.len).collect()
    }

    /// The segments from the root down to `leaf`.
    fn chain(&self, leaf: usize) -> Vec<usize> {
        let mut chain = vec![leaf];
        while let Some(p) = self.segments[*chain.last().expect("chain")].parent {
            chain.push(p);
        }
        chain.reverse();
        chain
    }

    /// The packed indices of the tokens of the row that ends with segment `leaf`, in row order.
    pub fn row_indices(&self, leaf: usize) -> Vec<i64> {
        self.chain(leaf).into_iter().flat_map(|s| self.starts[s]..self.starts[s] + self.segments[s].len).collect()
    }

    /// One attention call per segment, with the masks on `device`.
    pub fn attention(&self, sliding_window: Option<usize>, device: Device) -> SegmentedAttention {
        let calls = (0..self.segments.len())
            .filter(|&s| self.segments[s].len > 0)
            .map(|s| {
                let (len, offset) = (self.segments[s].len, self.offsets[s]);
                let mut keys: Vec<(i64, i64)> = Vec::new();
                for c in self.chain(s) {
                    let (start, n) = (self.starts[c], self.segments[c].len);
                    match keys.last_mut() {
                        Some(last) if last.0 + last.1 == start => last.1 += n,
                        _ => keys.push((start, n)),
                    }
                }
                // Key positions run 0..offset + len along the chain; the farthest key is offset + len - 1 back.
                let window = sliding_window.map(|w| w as i64).filter(|&w| w < offset + len);
                let mask = (offset > 0 || window.is_some()).then(|| {
                    let q = Tensor::arange_start(offset, offset + len, (Kind::Int64, device)).view([-1, 1]);
                    let k = Tensor::arange(offset + len, (Kind::Int64, device)).view([1, -1]);
                    let mut allowed = k.le_tensor(&q);
                    if let Some(w) = window {
                        allowed = allowed.logical_and(&(&q - &k).lt(w));
                    }
                    allowed.view([1, 1, len, offset + len])
                });
                SegmentCall { queries: (self.starts[s], len), keys, mask }
            })
            .collect();
        SegmentedAttention { calls }
    }
}

struct SegmentCall {
    queries: (i64, i64),
    /// (start, len) ranges of the packed sequence, in row order.
    keys: Vec<(i64, i64)>,
    /// Boolean [1, 1, queries, keys]; None for plain causal attention over the segment itself.
    mask: Option<Tensor>,
}

pub struct SegmentedAttention {
    calls: Vec<SegmentCall>,
}

impl SegmentedAttention {
    /// `q` [1, heads, n, d], `k`/`v` [1, kv_heads, n, d] over the packed sequence; returns [1, heads, n, d].
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, gqa: bool) -> Tensor {
        let gather = |x: &Tensor, ranges: &[(i64, i64)]| match ranges {
            [(start, len)] => x.narrow(2, *start, *len),
            _ => Tensor::cat(&ranges.iter().map(|(s, n)| x.narrow(2, *s, *n)).collect::<Vec<_>>(), 2),
        };
        let outs: Vec<Tensor> = self
            .calls
            .iter()
            .map(|c| {
                let q = q.narrow(2, c.queries.0, c.queries.1);
                let (k, v) = (gather(k, &c.keys), gather(v, &c.keys));
                Tensor::scaled_dot_product_attention(&q, &k, &v, c.mask.as_ref(), 0.0, c.mask.is_none(), scale, gqa)
            })
            .collect();
        match outs.len() {
            1 => outs.into_iter().next().expect("one"),
            _ => Tensor::cat(&outs, 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared prefix of 3 and two continuations of 2 and 1, then an independent row of 2.
    fn layout() -> SegmentLayout {
        SegmentLayout::new(vec![
            Segment { len: 3, parent: None },
            Segment { len: 2, parent: Some(0) },
            Segment { len: 1, parent: Some(0) },
            Segment { len: 2, parent: None },
        ])
    }

    #[test]
    fn positions_and_rows_follow_the_chains() {
        let l = layout();
        assert_eq!(l.positions(), vec![0, 1, 2, 3, 4, 3, 0, 1]);
        assert_eq!(l.row_indices(1), vec![0, 1, 2, 3, 4]);
        assert_eq!(l.row_indices(2), vec![0, 1, 2, 5]);
        assert_eq!(l.row_indices(3), vec![6, 7]);
        assert_eq!(l.len(), 8);
    }

    /// Each row attended alone (plain causal) gives the packed result at the row's tokens.
    #[test]
    fn packed_attention_equals_each_row_alone() {
        tch::manual_seed(0);
        let l = layout();
        let (heads, kv, d) = (4, 2, 8);
        let q = Tensor::randn([1, heads, l.len(), d], (Kind::Double, Device::Cpu));
        let k = Tensor::randn([1, kv, l.len(), d], (Kind::Double, Device::Cpu));
        let v = Tensor::randn([1, kv, l.len(), d], (Kind::Double, Device::Cpu));
        for window in [None, Some(2)] {
            let packed = l.attention(window, Device::Cpu).attend(&q, &k, &v, 0.3, true);
            for leaf in [1, 2, 3] {
                let idx = Tensor::from_slice(&l.row_indices(leaf));
                let t = idx.size()[0];
                let pick = |x: &Tensor| x.index_select(2, &idx);
                let qp = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([-1, 1]);
                let kp = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, -1]);
                let mut allowed = kp.le_tensor(&qp);
                if let Some(w) = window {
                    allowed = allowed.logical_and(&(&qp - &kp).lt(w as i64));
                }
                let alone = Tensor::scaled_dot_product_attention(
                    &pick(&q),
                    &pick(&k),
                    &pick(&v),
                    Some(allowed.view([1, 1, t, t])),
                    0.0,
                    false,
                    0.3,
                    true,
                );
                let diff = (pick(&packed) - alone).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "row {leaf}, window {window:?}: {diff}");
            }
        }
    }
}
