//! The engine's key/value cache: a fixed number of slots, each a contiguous run of positions, per layer one
//! buffer [slots, kv_heads, capacity + 1, head_dim]. A slot holds one row; a decode step reads the slots in
//! place (no gather) and writes each row's new token at its own position. The last position of every slot is
//! scratch, where the rows of a step that are not decoding write, so that their data stays intact.
use tch::{Device, Kind, Tensor};

use crate::model::config::TextConfig;
use crate::model::decoder::KvStore;

pub struct SlotCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    slots: usize,
    capacity: usize,
    kv_heads: i64,
    head_dim: i64,
}

/// Bytes the cache needs per token position of a slot.
pub fn bytes_per_token(cfg: &TextConfig, kind: Kind) -> usize {
    cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim() * kind.elt_size_in_bytes()
}

impl SlotCache {
    pub fn new(cfg: &TextConfig, slots: usize, capacity: usize, kind: Kind, device: Device) -> Self {
        let (kv_heads, head_dim) = (cfg.num_key_value_heads as i64, cfg.head_dim() as i64);
        let shape = [slots as i64, kv_heads, capacity as i64 + 1, head_dim];
        let buffer = || Tensor::zeros(shape, (kind, device));
        SlotCache {
            keys: (0..cfg.num_hidden_layers).map(|_| buffer()).collect(),
            values: (0..cfg.num_hidden_layers).map(|_| buffer()).collect(),
            slots,
            capacity,
            kv_heads,
            head_dim,
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions per slot (the scratch position not counted).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        self.keys.iter().chain(&self.values)
    }

    /// Copies positions [0, len) of slot `from` to slot `to`: a prefix another row computed.
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) {
        for buffer in self.buffers() {
            let source = buffer.narrow(0, from as i64, 1).narrow(2, 0, len as i64);
            buffer.narrow(0, to as i64, 1).narrow(2, 0, len as i64).copy_(&source);
        }
    }

    /// A cache of another shape holding, for each `(from, to, len)`, positions [0, len) of slot `from` in slot `to`.
    pub fn relayout(&self, slots: usize, capacity: usize, moves: &[(usize, usize, usize)]) -> SlotCache {
        let like = |t: &Tensor| {
            Tensor::zeros([slots as i64, self.kv_heads, capacity as i64 + 1, self.head_dim], (t.kind(), t.device()))
        };
        let new = SlotCache {
            keys: self.keys.iter().map(like).collect(),
            values: self.values.iter().map(like).collect(),
            slots,
            capacity,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        for (old, fresh) in self.buffers().zip(new.buffers()) {
            for &(from, to, len) in moves {
                fresh
                    .narrow(0, to as i64, 1)
                    .narrow(2, 0, len as i64)
                    .copy_(&old.narrow(0, from as i64, 1).narrow(2, 0, len as i64));
            }
        }
        new
    }

    /// The store of a prefill chunk of the row in `slot` whose first token is at position `start`.
    pub fn prefill(&self, slot: usize, start: usize) -> PrefillStore<'_> {
        PrefillStore { cache: self, slot: slot as i64, start: start as i64 }
    }

    /// The store of a decode step over slots [0, rows) that attends to positions [0, keys): each row writes its
    /// new token at `write_positions` [rows] (device, i64).
    pub fn decode(&self, write_positions: &Tensor, keys: i64) -> DecodeStore<'_> {
        let rows = write_positions.size()[0];
        let device = write_positions.device();
        let heads = Tensor::arange(self.kv_heads, (Kind::Int64, device)).view([1, -1]);
        let first_row = (Tensor::arange(rows, (Kind::Int64, device)) * self.kv_heads).view([-1, 1]);
        let index = ((first_row + heads) * (self.capacity as i64 + 1) + write_positions.view([-1, 1])).flatten(0, 1);
        DecodeStore { cache: self, rows, keys, index }
    }
}

pub struct PrefillStore<'a> {
    cache: &'a SlotCache,
    slot: i64,
    start: i64,
}

impl KvStore for PrefillStore<'_> {
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let write = |buffer: &Tensor, new: &Tensor| {
            let row = buffer.narrow(0, self.slot, 1);
            row.narrow(2, self.start, t).copy_(new);
            row.narrow(2, 0, self.start + t)
        };
        (write(&self.cache.keys[layer], &k), write(&self.cache.values[layer], &v))
    }
}

pub struct DecodeStore<'a> {
    cache: &'a SlotCache,
    rows: i64,
    keys: i64,
    /// Row of each (slot, head) in the buffers viewed as [slots * kv_heads * (capacity + 1), head_dim].
    index: Tensor,
}

impl KvStore for DecodeStore<'_> {
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let head_dim = self.cache.head_dim;
        let write = |buffer: &Tensor, new: &Tensor| {
            let _ = buffer.view([-1, head_dim]).index_copy_(0, &self.index, &new.reshape([-1, head_dim]));
            buffer.narrow(0, 0, self.rows).narrow(2, 0, self.keys)
        };
        (write(&self.cache.keys[layer], &k), write(&self.cache.values[layer], &v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TextConfig {
        let mut cfg = crate::model::tiny::tiny_config().text;
        cfg.num_hidden_layers = 1;
        cfg
    }

    #[test]
    fn prefill_and_decode_write_where_they_should() {
        let cfg = cfg();
        let cache = SlotCache::new(&cfg, 3, 8, Kind::Float, Device::Cpu);
        let (h, d) = (cfg.num_key_value_heads as i64, cfg.head_dim() as i64);
        let k = Tensor::ones([1, h, 4, d], (Kind::Float, Device::Cpu));
        let (keys, _) = cache.prefill(1, 2).append(0, k.shallow_clone(), k.shallow_clone());
        assert_eq!(keys.size(), vec![1, h, 6, d]);
        // slot 1 at position 5 (decoding), slots 0 and 2 to scratch
        let new = Tensor::full([3, h, 1, d], 2.0, (Kind::Float, Device::Cpu));
        let (keys, _) = cache.decode(&Tensor::from_slice(&[8i64, 6, 8]), 7).append(0, new.shallow_clone(), new);
        assert_eq!(keys.size(), vec![3, h, 7, d]);
        let column = |slot: i64| -> Vec<f32> { Vec::try_from(cache.keys[0].get(slot).get(0).select(1, 0)).unwrap() };
        assert_eq!(column(1), vec![0., 0., 1., 1., 1., 1., 2., 0., 0.]);
        assert_eq!(column(0), vec![0., 0., 0., 0., 0., 0., 0., 0., 2.]);
        let moved = cache.relayout(2, 10, &[(1, 0, 7)]);
        assert_eq!(
            Vec::<f32>::try_from(moved.keys[0].get(0).get(0).select(1, 0)).unwrap()[..8],
            [0., 0., 1., 1., 1., 1., 2., 0.]
        );
        let mut copied = moved;
        copied.copy_prefix(0, 1, 4);
        assert_eq!(
            Vec::<f32>::try_from(copied.values[0].get(1).get(0).select(1, 0)).unwrap()[..6],
            [0., 0., 1., 1., 0., 0.]
        );
    }
}
