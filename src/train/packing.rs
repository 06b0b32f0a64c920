//! Padding-free micro-batches: the rows of a micro-batch lie end to end in one sequence, and the rows of a group
//! (the chosen and rejected row of a preference pair) share the tokens they have in common at the start (system
//! text, image, user turn), which then run once: the other rows continue that prefix and attend to its keys.
use tch::{Device, Tensor};

use super::objective::EncodedRow;
use crate::error::{Error, Result};
use crate::model::attention::{Segment, SegmentLayout};
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;

/// Rows that share an image and their common prefix; each row carries its index in the micro-batch's output.
pub struct RowGroup<'a> {
    pub rows: Vec<(usize, &'a EncodedRow)>,
    /// Index of the image features its image placeholders take, if any.
    pub image: Option<usize>,
    pub share_prefix: bool,
}

/// The response tokens to score: for each, its row, the packed index of the hidden state that predicts it
/// (the token before it in its row) and its id.
pub struct ScoredTokens {
    pub row: Tensor,
    pub prev: Tensor,
    pub label: Tensor,
    /// Scored tokens per row.
    pub counts: Vec<i64>,
}

pub struct PackedBatch {
    /// [1, n]
    pub ids: Tensor,
    /// [1, n], each token's position in its row.
    pub positions: Tensor,
    pub layout: SegmentLayout,
    pub scored: ScoredTokens,
    /// The image (index into the features given to `pack`) of each run of image placeholders, in sequence order.
    pub image_runs: Vec<usize>,
    pub rows: usize,
    /// Tokens of the rows as if each ran alone (the data's tokens, for throughput).
    pub row_tokens: usize,
}

/// Tokens of the longest common prefix of `rows`, not ending inside a run of image placeholders (a run belongs
/// whole to one segment, so that it takes the image's features whole).
pub fn shared_prefix_len(rows: &[&EncodedRow]) -> usize {
    let Some((first, rest)) = rows.split_first() else { return 0 };
    let mut len = rest
        .iter()
        .map(|r| first.ids.iter().zip(&r.ids).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(first.ids.len());
    while len > 0
        && first.ids[len - 1] == IMAGE_TOKEN_INDEX
        && rows.iter().any(|r| r.ids.get(len) == Some(&IMAGE_TOKEN_INDEX))
    {
        len -= 1;
    }
    len
}

fn image_runs(ids: &[i64]) -> usize {
    ids.iter()
        .enumerate()
        .filter(|&(i, &id)| id == IMAGE_TOKEN_INDEX && (i == 0 || ids[i - 1] != IMAGE_TOKEN_INDEX))
        .count()
}

/// Packs the groups in order (each group: its shared prefix, then what each row adds to it).
pub fn pack(groups: &[RowGroup], device: Device) -> Result<PackedBatch> {
    let rows = groups.iter().map(|g| g.rows.len()).sum();
    let (mut segments, mut ids, mut image_runs_out) = (Vec::new(), Vec::new(), Vec::new());
    let mut leaves = vec![(0usize, 0usize, &[] as &[i64], &[] as &[bool]); rows];
    let mut row_tokens = 0;
    for group in groups {
        let members: Vec<&EncodedRow> = group.rows.iter().map(|(_, r)| *r).collect();
        let shared = if group.share_prefix && members.len() > 1 { shared_prefix_len(&members) } else { 0 };
        let mut push = |tokens: &[i64], parent: Option<usize>, ids: &mut Vec<i64>| -> Result<usize> {
            let runs = image_runs(tokens);
            match group.image {
                Some(image) => image_runs_out.extend(std::iter::repeat_n(image, runs)),
                None if runs > 0 => {
                    return Err(Error::Input(format!("a row has {runs} image placeholders but no image")))
                }
                None => {}
            }
            segments.push(Segment { len: tokens.len() as i64, parent });
            ids.extend_from_slice(tokens);
            Ok(segments.len() - 1)
        };
        let prefix = (shared > 0).then(|| push(&members[0].ids[..shared], None, &mut ids)).transpose()?;
        for (out, row) in &group.rows {
            let runs = image_runs(&row.ids);
            if runs != group.image.is_some() as usize {
                return Err(Error::Input(format!(
                    "a row has {runs} image placeholders; one image per row is supported"
                )));
            }
            let leaf = if row.ids.len() > shared {
                push(&row.ids[shared..], prefix, &mut ids)?
            } else {
                prefix.expect("a non-empty row")
            };
            leaves[*out] = (leaf, shared, &row.ids, &row.scored);
            row_tokens += row.ids.len();
        }
    }
    let layout = SegmentLayout::new(segments);
    let (mut row_idx, mut prev, mut label, mut counts) = (Vec::new(), Vec::new(), Vec::new(), vec![0i64; rows]);
    for (r, (leaf, _, row_ids, scored)) in leaves.iter().enumerate() {
        let packed = layout.row_indices(*leaf);
        for i in 1..row_ids.len() {
            if scored[i] {
                row_idx.push(r as i64);
                prev.push(packed[i - 1]);
                label.push(row_ids[i]);
                counts[r] += 1;
            }
        }
    }
    let n = ids.len() as i64;
    let on = |v: &[i64]| Tensor::from_slice(v).to_device(device);
    Ok(PackedBatch {
        ids: on(&ids).view([1, n]),
        positions: on(&layout.positions()).view([1, n]),
        scored: ScoredTokens { row: on(&row_idx), prev: on(&prev), label: on(&label), counts },
        layout,
        image_runs: image_runs_out,
        rows,
        row_tokens,
    })
}

/// Token rows right-padded into [rows, t] tensors (ids, attention mask, scored), as transformers takes them: what
/// `--dump-first-step` writes for the reference implementations.
pub fn padded(rows: &[&EncodedRow], pad_id: i64) -> (Tensor, Tensor, Tensor) {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut scored) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let pad = t - row.ids.len();
        ids.extend(row.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        mask.extend(std::iter::repeat_n(1i64, row.ids.len()).chain(std::iter::repeat_n(0, pad)));
        scored.extend(row.scored.iter().map(|&s| s as i64).chain(std::iter::repeat_n(0, pad)));
    }
    let shape = [rows.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
        Tensor::from_slice(&scored).view(shape),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: i64 = IMAGE_TOKEN_INDEX;

    fn row(ids: &[i64], first_scored: usize) -> EncodedRow {
        EncodedRow { ids: ids.to_vec(), scored: (0..ids.len()).map(|i| i >= first_scored).collect() }
    }

    #[test]
    fn the_prefix_stops_before_a_run_of_image_placeholders() {
        let (a, b) = (row(&[1, 2, IMG, IMG, 5, 6], 4), row(&[1, 2, IMG, IMG, 5, 7], 4));
        assert_eq!(shared_prefix_len(&[&a, &b]), 5);
        let c = row(&[1, 2, IMG, IMG, IMG, 7], 5);
        assert_eq!(shared_prefix_len(&[&a, &c]), 2);
        assert_eq!(shared_prefix_len(&[&a, &row(&[3, 2], 1)]), 0);
    }

    #[test]
    fn a_pair_packs_prefix_then_both_continuations() {
        let (c, r) = (row(&[1, 2, IMG, IMG, 5, 6, 7], 5), row(&[1, 2, IMG, IMG, 5, 8], 4));
        let single = row(&[1, 3, 4], 1);
        let groups = [
            RowGroup { rows: vec![(0, &c), (2, &r)], image: Some(0), share_prefix: true },
            RowGroup { rows: vec![(1, &single)], image: None, share_prefix: true },
        ];
        let b = pack(&groups, Device::Cpu).unwrap();
        assert_eq!(Vec::<i64>::try_from(b.ids.view([-1])).unwrap(), vec![1, 2, IMG, IMG, 5, 6, 7, 8, 1, 3, 4]);
        assert_eq!(Vec::<i64>::try_from(b.positions.view([-1])).unwrap(), vec![0, 1, 2, 3, 4, 5, 6, 5, 0, 1, 2]);
        assert_eq!(b.image_runs, vec![0]);
        assert_eq!(b.scored.counts, vec![2, 2, 2]);
        // chosen tokens 6, 7 come from packed 4, 5; the single row's 3, 4 from 8, 9; rejected 5 from 3, 8 from 4
        assert_eq!(Vec::<i64>::try_from(&b.scored.prev).unwrap(), vec![4, 5, 8, 9, 3, 4]);
        assert_eq!(Vec::<i64>::try_from(&b.scored.label).unwrap(), vec![6, 7, 3, 4, 5, 8]);
        assert_eq!(b.row_tokens, 16);
    }

    #[test]
    fn a_row_that_is_the_whole_prefix_or_prompts_that_differ() {
        let (c, r) = (row(&[1, IMG, 5], 2), row(&[1, IMG, 5, 6], 2));
        let b = pack(&[RowGroup { rows: vec![(0, &c), (1, &r)], image: Some(0), share_prefix: true }], Device::Cpu)
            .unwrap();
        assert_eq!(Vec::<i64>::try_from(b.ids.view([-1])).unwrap(), vec![1, IMG, 5, 6]);
        assert_eq!(Vec::<i64>::try_from(&b.scored.prev).unwrap(), vec![1, 1, 2]);
        let (c, r) = (row(&[2, IMG, 5], 2), row(&[1, IMG, 5], 2));
        let b = pack(&[RowGroup { rows: vec![(0, &c), (1, &r)], image: Some(3), share_prefix: true }], Device::Cpu)
            .unwrap();
        assert_eq!(b.ids.size(), vec![1, 6]);
        assert_eq!(b.image_runs, vec![3, 3]);
        let none = pack(&[RowGroup { rows: vec![(0, &c)], image: None, share_prefix: true }], Device::Cpu);
        assert!(none.is_err());
    }
}
