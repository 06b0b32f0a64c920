//! The generation engine: continuous batching over a fixed number of slots.
//!
//! - A request waits in a queue until a slot is free; a row that stops frees its slot at once, and the next
//!   request takes it while the others keep decoding.
//! - A new row's prompt is prefilled in chunks of `prefill_chunk` tokens (boundaries at multiples of it), one or
//!   two chunks between decode steps, so that a long prompt never stalls the rows that are decoding.
//! - Prefixes are shared: every slot keeps the keys and values of what it holds (a live row, or the last row it
//!   held). A request whose prompt starts like the content of a slot, with the same images, starts from there:
//!   in place when that slot is free, else copied from the live row's slot. The two prompts of one picture in
//!   stage 1, and the questions about one image in an evaluation, compute the image's prefix once.
//! - Decode steps read the slots in place (the cache is [slots, kv_heads, positions, head_dim]) and, on a GPU,
//!   replay a CUDA graph captured per (rows, keys) bucket.
//! - The next token is chosen on the device (`sampling`), from noise that depends on (seed, row seed, step,
//!   token) only: a row's tokens do not depend on which rows share its steps, where its prefix came from, or how
//!   its prompt was chunked, up to floating-point rounding of the batched products.
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tch::{Kind, Tensor};

use super::cuda_graph::{self, CudaGraph, GraphPool};
use super::images::ImageKey;
use super::kv::{bytes_per_token, SlotCache};
use super::sampling::{choose_on_host, Draw};
use super::{new_token_limit, too_long, Generated, PreparedPrompt, SamplingConfig, StopReason};
use crate::error::{Error, Result};
use crate::image::anyres::num_image_features;
use crate::model::decoder::AttnMask;
use crate::model::LlavaNext;

/// How many rows decode together (`--batch-size`, a profile's `batch_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "BatchSizeValue", into = "BatchSizeValue")]
pub enum BatchSize {
    /// This many, or fewer when the cache budget cannot hold them at the rows' length.
    Rows(usize),
    /// As many as the cache budget holds at the rows' length, as vLLM sizes its batch: each row's key/value
    /// positions plus the image features of a row queued behind it and of a cached image, at most
    /// [`AUTO_MAX_ROWS`]. Without a budget (the CPU without `--max-batch-tokens`): [`UNBUDGETED_AUTO_ROWS`].
    Auto,
}

/// vLLM's default `max_num_seqs`.
pub const AUTO_MAX_ROWS: usize = 256;
/// `auto` where the memory is not measured: the former fixed default.
pub const UNBUDGETED_AUTO_ROWS: usize = 8;

impl BatchSize {
    /// The fixed number of rows, or `auto_rows` for `auto`.
    pub fn rows_or(self, auto_rows: usize) -> usize {
        match self {
            BatchSize::Rows(rows) => rows,
            BatchSize::Auto => auto_rows,
        }
    }

    /// Prompts per static batch (`--static-batching`, which sizes nothing from memory): `auto` is 8.
    pub fn static_rows(self) -> usize {
        self.rows_or(UNBUDGETED_AUTO_ROWS)
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim() {
            "auto" => Ok(BatchSize::Auto),
            number => match number.parse::<usize>() {
                Ok(0) | Err(_) => {
                    Err(format!("`{text}` is not a batch size: give a number of rows (at least 1) or auto"))
                }
                Ok(rows) => Ok(BatchSize::Rows(rows)),
            },
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Rows(rows) => write!(f, "{rows}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

/// A batch size as YAML and JSON write it: a number, or the word `auto`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum BatchSizeValue {
    Rows(usize),
    Word(String),
}

impl TryFrom<BatchSizeValue> for BatchSize {
    type Error = String;
    fn try_from(value: BatchSizeValue) -> std::result::Result<Self, String> {
        match value {
            BatchSizeValue::Rows(rows) => rows.to_string().parse(),
            BatchSizeValue::Word(word) => word.parse(),
        }
    }
}

impl From<BatchSize> for BatchSizeValue {
    fn from(size: BatchSize) -> Self {
        match size {
            BatchSize::Rows(rows) => BatchSizeValue::Rows(rows),
            BatchSize::Auto => BatchSizeValue::Word("auto".into()),
        }
    }
}

/// How the engine batches and how much memory its cache takes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineOptions {
    /// Rows that decode together.
    pub slots: BatchSize,
    /// Key/value positions the cache holds for all slots together. Default: what `gpu_memory_fraction` leaves
    /// on a GPU; on the CPU as many as the rows need.
    pub max_batch_tokens: Option<usize>,
    /// Share of the GPU's memory that the model, the cache and the work of a step may fill together.
    pub gpu_memory_fraction: f64,
    /// Prompt tokens prefilled per chunk. The first chunk of a prompt runs with the fused causal kernel; later
    /// chunks, and prompts that continue a shared prefix, need an explicit mask, which costs more (on the CPU
    /// about a third more for a 2k-token prompt in chunks of 512), so the default keeps whole prompts in one.
    pub prefill_chunk: usize,
    /// Replay decode steps as CUDA graphs (on a GPU, when stic was built with the CUDA shim).
    pub cuda_graphs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            slots: BatchSize::Auto,
            max_batch_tokens: None,
            gpu_memory_fraction: 0.9,
            prefill_chunk: 4096,
            cuda_graphs: true,
        }
    }
}

/// GPU memory kept free for the work of a step (prefill activations, logits, graph pools) when the cache is
/// sized from `gpu_memory_fraction`.
const WORKSPACE_BYTES: u64 = 3 << 30;
/// Slot capacities grow in steps of this many positions.
const CAPACITY_STEP: usize = 256;
/// Prefixes shorter than this are computed again rather than copied.
const MIN_SHARED_PREFIX: usize = 32;

/// One prompt to generate for.
pub struct Request {
    pub prompt: PreparedPrompt,
    /// The images of the prompt, in order: prefixes are shared only between prompts with the same images.
    pub images: Vec<ImageKey>,
    /// With the sampling seed, the seed of this row's noise.
    pub row_seed: u64,
    pub max_new_tokens: usize,
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum Refusal {
    /// Its prompt fills the model's context: skip it.
    TooLong(Error),
    /// Prompt and answer need more cache than there is: no request of that size can run.
    CannotFit(Error),
}

/// What the engine did, for reports and benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Prompt tokens run through the model.
    pub prefill_tokens: usize,
    /// Prompt tokens whose keys and values came from another row's prefix instead.
    pub reused_prefix_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub decode_steps: usize,
    /// Decode steps replayed from a CUDA graph.
    pub graph_steps: usize,
    /// Why decode steps ran eagerly instead of from CUDA graphs (None while graphs are in use).
    pub cuda_graphs_off: Option<String>,
    pub finished_rows: usize,
    /// The cache's shape at the end: slots and positions per slot.
    pub cache_slots: usize,
    pub cache_capacity: usize,
    /// Cache size limit in positions (None: as the rows need).
    pub cache_budget: Option<usize>,
}

struct Row<T> {
    tag: T,
    row_seed: u64,
    prompt_tokens: usize,
    limit: usize,
    limit_stop: StopReason,
    features: Vec<Tensor>,
    /// The prompt's embeddings while it is being prefilled.
    embeds: Option<Tensor>,
    generated: Vec<i64>,
    admitted: u64,
}

struct Slot<T> {
    /// The tokens whose keys and values are at positions [0, filled) once computed: the row's prompt, then the
    /// tokens it fed back. A free slot keeps them for the next row that starts the same way.
    content: Vec<i64>,
    images: Vec<ImageKey>,
    filled: usize,
    released_at: u64,
    row: Option<Row<T>>,
}

impl<T> Slot<T> {
    fn empty() -> Self {
        Slot { content: Vec::new(), images: Vec::new(), filled: 0, released_at: 0, row: None }
    }

    fn prefilling(&self) -> bool {
        self.row.as_ref().is_some_and(|r| self.filled < r.prompt_tokens)
    }

    fn decoding(&self) -> bool {
        self.row.as_ref().is_some_and(|r| self.filled >= r.prompt_tokens)
    }
}

/// A decode step captured for one (rows, keys) bucket, with its input and output buffers.
struct CapturedStep {
    graph: CudaGraph,
    tokens: Tensor,
    positions: Tensor,
    writes: Tensor,
    logits: Tensor,
}

struct DecodeGraphs {
    pool: GraphPool,
    steps: HashMap<(i64, i64), CapturedStep>,
}

pub struct Engine<'m, T> {
    model: &'m LlavaNext,
    sampling: SamplingConfig,
    stop_ids: Vec<i64>,
    opts: EngineOptions,
    context: usize,
    max_image_tokens: usize,
    budget: Option<usize>,
    /// The most rows at once: a fixed batch size, or `auto`'s bound.
    max_rows: usize,
    /// Cache positions that one row's share of queued and cached image features takes (`auto` only).
    feature_positions: usize,
    waiting: VecDeque<(T, Request)>,
    /// Rows that stop before their first token (`max_new_tokens` 0).
    ready: Vec<(T, Generated)>,
    slots: Vec<Slot<T>>,
    cache: Option<SlotCache>,
    clock: u64,
    graphs: Option<DecodeGraphs>,
    pub stats: EngineStats,
}

/// The cache positions `limit` new tokens after a prompt of `prompt_tokens` take (the last token is not fed back).
fn positions_needed(prompt_tokens: usize, limit: usize) -> usize {
    prompt_tokens + limit.saturating_sub(1)
}

fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Bucketed shapes of a replayed decode step: rows to a power of two, keys to a multiple of `CAPACITY_STEP`.
fn graph_bucket(rows: usize, keys: usize, slots: usize, positions: usize) -> (i64, i64) {
    (
        rows.next_power_of_two().min(slots) as i64,
        keys.div_ceil(CAPACITY_STEP).saturating_mul(CAPACITY_STEP).min(positions) as i64,
    )
}

impl<'m, T> Engine<'m, T> {
    pub fn new(
        model: &'m LlavaNext,
        sampling: SamplingConfig,
        stop_ids: Vec<i64>,
        opts: EngineOptions,
    ) -> Result<Self> {
        sampling.validate()?;
        if opts.slots == BatchSize::Rows(0) || opts.prefill_chunk == 0 {
            return Err(Error::Input("the batch size and the prefill chunk must be at least 1".into()));
        }
        let device = model.device();
        let budget = match opts.max_batch_tokens {
            Some(tokens) => Some(tokens),
            None if device.is_cuda() => gpu_budget(model, &opts)?,
            None => None,
        };
        let image = &model.cfg.image;
        let patch = model.cfg.vision.patch_size as u32;
        let max_image_tokens =
            image.grid_pinpoints.iter().map(|&p| num_image_features(p, image, patch)).max().unwrap_or(0);
        let max_rows = opts.slots.rows_or(if budget.is_some() { AUTO_MAX_ROWS } else { UNBUDGETED_AUTO_ROWS });
        let feature_positions = match opts.slots {
            BatchSize::Auto => {
                let text = &model.language_model.cfg;
                let feature_bytes = max_image_tokens * text.hidden_size * model.kind().elt_size_in_bytes();
                (2 * feature_bytes).div_ceil(bytes_per_token(text, model.kind()))
            }
            BatchSize::Rows(_) => 0,
        };
        let (graphs, cuda_graphs_off) = if !device.is_cuda() {
            (None, Some("cpu device".to_string()))
        } else if !opts.cuda_graphs {
            (None, Some("disabled by --no-cuda-graphs".to_string()))
        } else if !cuda_graph::available(device) {
            (None, Some("stic was built without the CUDA graph shim".to_string()))
        } else {
            match GraphPool::new() {
                Ok(pool) => (Some(DecodeGraphs { pool, steps: HashMap::new() }), None),
                Err(e) => {
                    eprintln!("CUDA graphs unavailable ({e}): decode steps run eagerly");
                    (None, Some(format!("unavailable: {e}")))
                }
            }
        };
        Ok(Engine {
            model,
            sampling,
            stop_ids,
            context: model.cfg.text.max_position_embeddings,
            max_image_tokens,
            stats: EngineStats { cache_budget: budget, cuda_graphs_off, ..Default::default() },
            budget,
            max_rows,
            feature_positions,
            opts,
            waiting: VecDeque::new(),
            ready: Vec::new(),
            slots: Vec::new(),
            cache: None,
            clock: 0,
            graphs,
        })
    }

    /// Requests queued and not yet given a slot, or done without one (no new tokens to write).
    pub fn queued(&self) -> usize {
        self.waiting.len() + self.ready.len()
    }

    /// Rows that run together: the cache's slots once it is sized, else what the first waiting request would
    /// get (1 while none waits). Callers keep this many requests queued.
    pub fn rows(&self) -> usize {
        if let Some(cache) = &self.cache {
            return cache.slots();
        }
        match self.waiting.front() {
            Some((_, request)) => {
                let (needed, headroom) = self.positions_of(request);
                self.slots_for(self.capacity_for(needed, headroom))
            }
            None if self.opts.slots == BatchSize::Auto => 1,
            None => self.max_rows,
        }
    }

    /// Nothing queued, nothing running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.ready.is_empty() && self.slots.iter().all(|s| s.row.is_none())
    }

    /// Queues a request; its output comes out of [`step`](Self::step) with `tag`.
    pub fn submit(&mut self, tag: T, request: Request) -> std::result::Result<(), Refusal> {
        let prompt_tokens = request.prompt.ids.len();
        let Some((limit, _)) = new_token_limit(prompt_tokens, request.max_new_tokens, self.context) else {
            return Err(Refusal::TooLong(too_long(prompt_tokens, self.context)));
        };
        let needed = positions_needed(prompt_tokens, limit) + 1;
        if let Some(budget) = self.budget.filter(|&b| needed > b) {
            return Err(Refusal::CannotFit(Error::Input(format!(
                "a prompt of {prompt_tokens} tokens with up to {limit} new tokens needs {needed} key/value cache positions, \
                 and the cache holds {budget}: raise --max-batch-tokens (or --gpu-memory-fraction), or lower --max-new-tokens"
            ))));
        }
        if limit == 0 {
            let output = Generated { tokens: Vec::new(), prompt_tokens, stop: StopReason::Length };
            self.ready.push((tag, output));
        } else {
            self.waiting.push_back((tag, request));
        }
        Ok(())
    }

    /// Admits waiting requests into free slots, runs the prefill chunks of this step and one decode step of every
    /// decoding row. Returns the rows that stopped.
    pub fn step(&mut self) -> Result<Vec<(T, Generated)>> {
        let mut finished = std::mem::take(&mut self.ready);
        self.admit();
        tch::no_grad(|| -> Result<()> {
            let started = Instant::now();
            self.prefill(&mut finished)?;
            let prefilled = Instant::now();
            self.stats.prefill_seconds += (prefilled - started).as_secs_f64();
            self.decode(&mut finished)?;
            self.stats.decode_seconds += prefilled.elapsed().as_secs_f64();
            Ok(())
        })?;
        self.stats.finished_rows += finished.len();
        Ok(finished)
    }

    fn limit_of(&self, request: &Request) -> (usize, StopReason) {
        new_token_limit(request.prompt.ids.len(), request.max_new_tokens, self.context).expect("checked by submit")
    }

    /// Positions per slot to allocate for a row that needs `needed`, plus `headroom` for larger images in later
    /// prompts, so that the cache rarely grows during a job.
    fn capacity_for(&self, needed: usize, headroom: usize) -> usize {
        let mut capacity = (needed + headroom).div_ceil(CAPACITY_STEP) * CAPACITY_STEP;
        capacity = capacity.min(self.context);
        if let Some(budget) = self.budget {
            capacity = capacity.min(budget - 1);
        }
        capacity.max(needed)
    }

    /// Slots of a cache with `capacity` positions each: the batch size, fewer when the budget cannot hold them.
    fn slots_for(&self, capacity: usize) -> usize {
        let per_slot = capacity + 1 + self.feature_positions;
        self.budget.map_or(self.max_rows, |b| self.max_rows.min(b / per_slot)).max(1)
    }

    /// Cache positions `request` needs, and the headroom for the largest image in place of each of its images.
    fn positions_of(&self, request: &Request) -> (usize, usize) {
        let (limit, _) = self.limit_of(request);
        let needed = positions_needed(request.prompt.ids.len(), limit);
        let headroom = request
            .prompt
            .image_features
            .iter()
            .map(|f| self.max_image_tokens.saturating_sub(f.size()[0] as usize))
            .sum();
        (needed, headroom)
    }

    /// Makes the cache hold `needed` positions per slot. False while that must wait for the running rows to stop
    /// (a limited cache is reallocated empty, so that old and new never take memory together).
    fn ensure_capacity(&mut self, needed: usize, headroom: usize) -> bool {
        if self.cache.as_ref().is_some_and(|c| c.capacity() >= needed) {
            return true;
        }
        let capacity = self.capacity_for(needed, headroom);
        let slots = self.slots_for(capacity);
        let running: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].row.is_some()).collect();
        let cfg = &self.model.language_model.cfg;
        match self.cache.take() {
            None => self.cache = Some(SlotCache::new(cfg, slots, capacity, self.model.kind(), self.model.device())),
            Some(old) if self.budget.is_none() => {
                // Unlimited (CPU): move the running rows into the larger cache at once.
                let moves: Vec<(usize, usize, usize)> =
                    running.iter().enumerate().map(|(to, &from)| (from, to, self.slots[from].filled)).collect();
                self.cache = Some(old.relayout(slots.max(running.len()), capacity, &moves));
                let mut old_slots = std::mem::take(&mut self.slots);
                self.slots =
                    running.iter().map(|&from| std::mem::replace(&mut old_slots[from], Slot::empty())).collect();
            }
            Some(old) if !running.is_empty() => {
                self.cache = Some(old);
                return false;
            }
            Some(old) => {
                drop(old);
                self.slots.clear();
                self.cache = Some(SlotCache::new(cfg, slots, capacity, self.model.kind(), self.model.device()));
            }
        }
        let cache = self.cache.as_ref().expect("just set");
        self.slots.resize_with(cache.slots(), Slot::empty);
        self.stats.cache_slots = cache.slots();
        self.stats.cache_capacity = cache.capacity();
        if let Some(graphs) = &mut self.graphs {
            graphs.steps.clear(); // they point at the old buffers
        }
        true
    }

    fn admit(&mut self) {
        while let Some((_, request)) = self.waiting.front() {
            let (needed, headroom) = self.positions_of(request);
            if !self.ensure_capacity(needed, headroom) {
                return;
            }
            let (_, request) = self.waiting.front().expect("still there");
            let Some((slot, source, shared)) = self.place(request) else { return };
            let (tag, request) = self.waiting.pop_front().expect("still there");
            if let Some(from) = source.filter(|&f| f != slot) {
                self.cache.as_mut().expect("allocated").copy_prefix(from, slot, shared);
            }
            self.stats.reused_prefix_tokens += shared;
            self.clock += 1;
            let (limit, limit_stop) = new_token_limit(request.prompt.ids.len(), request.max_new_tokens, self.context)
                .expect("checked by submit");
            let target = &mut self.slots[slot];
            target.content = request.prompt.ids;
            target.images = request.images;
            target.filled = shared;
            target.row = Some(Row {
                tag,
                row_seed: request.row_seed,
                prompt_tokens: target.content.len(),
                limit,
                limit_stop,
                features: request.prompt.image_features,
                embeds: None,
                generated: Vec::new(),
                admitted: self.clock,
            });
        }
    }

    /// Where `request` goes: (slot, slot its prefix comes from, prefix length), or None when it must wait (no
    /// free slot, or a row still prefilling holds a longer prefix than is ready now).
    fn place(&self, request: &Request) -> Option<(usize, Option<usize>, usize)> {
        let ids = &request.prompt.ids;
        let most = ids.len() - 1; // the last prompt token is always computed: its logits give the first token
        let mut best: Option<(usize, usize)> = None;
        let mut coming = 0;
        for (s, slot) in self.slots.iter().enumerate() {
            if slot.images != request.images || slot.content.is_empty() {
                continue;
            }
            let common = common_prefix(ids, &slot.content).min(most);
            let ready = common.min(slot.filled);
            if slot.prefilling() {
                coming = coming.max(common);
            }
            let better = match best {
                None => true,
                Some((b, len)) => ready > len || (ready == len && self.slots[b].row.is_some() && slot.row.is_none()),
            };
            if better {
                best = Some((s, ready));
            }
        }
        let best = best.filter(|&(_, len)| len >= MIN_SHARED_PREFIX);
        if coming >= MIN_SHARED_PREFIX && coming > best.map_or(0, |b| b.1) {
            return None;
        }
        let free = (0..self.slots.len()).filter(|&s| self.slots[s].row.is_none());
        match best {
            Some((s, len)) if self.slots[s].row.is_none() => Some((s, Some(s), len)),
            Some((s, len)) => free.min_by_key(|&f| self.slots[f].released_at).map(|f| (f, Some(s), len)),
            None => free.min_by_key(|&f| self.slots[f].released_at).map(|f| (f, None, 0)),
        }
    }

    /// Prefill chunks of the rows that are prefilling, oldest first, until `prefill_chunk` tokens ran this step.
    fn prefill(&mut self, finished: &mut Vec<(T, Generated)>) -> Result<()> {
        let mut order: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].prefilling()).collect();
        order.sort_by_key(|&s| self.slots[s].row.as_ref().map(|r| r.admitted));
        let mut spent = 0;
        for s in order {
            while spent < self.opts.prefill_chunk && self.slots[s].prefilling() {
                spent += self.prefill_chunk(s, finished)?;
            }
        }
        Ok(())
    }

    /// Runs the next chunk of the prompt in slot `s`; after the last one, chooses the row's first token.
    fn prefill_chunk(&mut self, s: usize, finished: &mut Vec<(T, Generated)>) -> Result<usize> {
        let model = self.model;
        let lm = &model.language_model;
        let device = model.device();
        let chunk = self.opts.prefill_chunk;
        let slot = &mut self.slots[s];
        let row = slot.row.as_mut().expect("a prefilling row");
        if row.embeds.is_none() {
            let ids = Tensor::from_slice(&slot.content).view([1, -1]).to_device(device);
            row.embeds = Some(model.embed_inputs(&ids, &std::mem::take(&mut row.features))?);
        }
        let start = slot.filled;
        let end = ((start / chunk + 1) * chunk).min(row.prompt_tokens);
        let t = (end - start) as i64;
        let x = row.embeds.as_ref().expect("computed").narrow(1, start as i64, t);
        let positions = Tensor::arange_start(start as i64, end as i64, (Kind::Int64, device)).view([1, t]);
        let window = lm.cfg.sliding_window;
        let mask = if start == 0 && window.is_none_or(|w| w >= end) {
            AttnMask::Causal
        } else {
            let q = positions.view([t, 1]);
            let k = Tensor::arange(end as i64, (Kind::Int64, device)).view([1, -1]);
            let mut allowed = k.le_tensor(&q);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&q - &k).lt(w as i64));
            }
            AttnMask::Explicit(allowed.view([1, 1, t, end as i64]))
        };
        let cache = self.cache.as_ref().expect("allocated");
        let hidden = lm.forward_with_mask(&x, &positions, &mask, Some(&mut cache.prefill(s, start)));
        slot.filled = end;
        self.stats.prefill_tokens += t as usize;
        if end == row.prompt_tokens {
            row.embeds = None;
            let draw = Draw { row_seed: row.row_seed, step: 0 };
            let logits = lm.logits(&hidden.narrow(1, t - 1, 1)).squeeze_dim(1);
            let token = choose_on_host(&logits, &self.sampling, &[draw])[0];
            self.accept(s, token, finished);
        }
        Ok(t as usize)
    }

    /// Records the token a row chose; a row that stops frees its slot.
    fn accept(&mut self, s: usize, token: i64, finished: &mut Vec<(T, Generated)>) {
        self.stats.generated_tokens += 1;
        let slot = &mut self.slots[s];
        let row = slot.row.as_mut().expect("a running row");
        row.generated.push(token);
        let stop = if self.stop_ids.contains(&token) {
            StopReason::Eos
        } else if row.generated.len() == row.limit {
            row.limit_stop
        } else {
            return;
        };
        let row = slot.row.take().expect("a running row");
        self.clock += 1;
        slot.released_at = self.clock;
        finished.push((row.tag, Generated { tokens: row.generated, prompt_tokens: row.prompt_tokens, stop }));
    }

    /// One decode step of every decoding row: feeds its last token and chooses the next.
    fn decode(&mut self, finished: &mut Vec<(T, Generated)>) -> Result<()> {
        let rows: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].decoding()).collect();
        let Some(&last) = rows.last() else { return Ok(()) };
        let n = last + 1;
        let scratch = self.cache.as_ref().expect("allocated").capacity() as i64;
        let (mut tokens, mut positions, mut writes) = (vec![0i64; n], vec![0i64; n], vec![scratch; n]);
        let mut draws = Vec::with_capacity(rows.len());
        for &s in &rows {
            let slot = &mut self.slots[s];
            let row = slot.row.as_ref().expect("decoding");
            let token = *row.generated.last().expect("prefill chose the first token");
            tokens[s] = token;
            positions[s] = slot.filled as i64;
            writes[s] = slot.filled as i64;
            draws.push(Draw { row_seed: row.row_seed, step: row.generated.len() as u64 });
            slot.content.push(token);
            slot.filled += 1;
        }
        let keys = positions.iter().max().expect("rows") + 1;
        let logits = self.decode_logits(&tokens, &positions, &writes, keys)?;
        let index = Tensor::from_slice(&rows.iter().map(|&s| s as i64).collect::<Vec<_>>()).to_device(logits.device());
        let chosen = choose_on_host(&logits.index_select(0, &index), &self.sampling, &draws);
        self.stats.decode_steps += 1;
        for (&s, token) in rows.iter().zip(chosen) {
            self.accept(s, token, finished);
        }
        Ok(())
    }

    /// Logits [rows, vocab] of one decode step over slots [0, rows), from a CUDA graph when there is one.
    fn decode_logits(&mut self, tokens: &[i64], positions: &[i64], writes: &[i64], keys: i64) -> Result<Tensor> {
        let device = self.model.device();
        let cache = self.cache.as_ref().expect("allocated");
        let upload = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let Some(graphs) = self.graphs.as_mut() else {
            return Ok(decode_forward(self.model, cache, &upload(tokens), &upload(positions), &upload(writes), keys));
        };
        let n = tokens.len();
        let (rows, keys) = graph_bucket(n, keys as usize, cache.slots(), cache.capacity());
        let padded = |v: &[i64], fill: i64| {
            let mut out = v.to_vec();
            out.resize(rows as usize, fill);
            upload(&out)
        };
        let (tokens, positions, writes) =
            (padded(tokens, 0), padded(positions, 0), padded(writes, cache.capacity() as i64));
        if !graphs.steps.contains_key(&(rows, keys)) {
            let model = self.model;
            let mut logits = None;
            let captured = CudaGraph::capture(device, &graphs.pool, &mut || {
                logits = Some(decode_forward(model, cache, &tokens, &positions, &writes, keys));
            });
            match (captured, logits) {
                (Ok(graph), Some(logits)) => {
                    let step = CapturedStep {
                        graph,
                        tokens: tokens.shallow_clone(),
                        positions: positions.shallow_clone(),
                        writes: writes.shallow_clone(),
                        logits,
                    };
                    graphs.steps.insert((rows, keys), step);
                }
                (captured, _) => {
                    let why = captured
                        .err()
                        .map_or_else(|| "the captured step gave no logits".to_string(), |e| e.to_string());
                    eprintln!("CUDA graph capture failed ({why}): decode steps run eagerly");
                    self.stats.cuda_graphs_off = Some(format!("capture failed: {why}"));
                    self.graphs = None;
                    return Ok(
                        decode_forward(self.model, cache, &tokens, &positions, &writes, keys).narrow(0, 0, n as i64)
                    );
                }
            }
        }
        let step = &graphs.steps[&(rows, keys)];
        for (buffer, data) in [(&step.tokens, &tokens), (&step.positions, &positions), (&step.writes, &writes)] {
            if buffer.data_ptr() != data.data_ptr() {
                buffer.shallow_clone().copy_(data);
            }
        }
        // A step just captured ran once for real as its warm-up; replaying it writes the same cache entries again.
        step.graph.replay()?;
        self.stats.graph_steps += 1;
        Ok(step.logits.narrow(0, 0, n as i64))
    }
}

/// The decode step itself, device work only (so that it can be captured): rows [0, n) feed `tokens` at
/// `positions`, write their keys and values at `writes` and attend to positions [0, keys) up to their own.
fn decode_forward(
    model: &LlavaNext,
    cache: &SlotCache,
    tokens: &Tensor,
    positions: &Tensor,
    writes: &Tensor,
    keys: i64,
) -> Tensor {
    let lm = &model.language_model;
    let n = tokens.size()[0];
    let q = positions.view([n, 1]);
    let k = Tensor::arange(keys, (Kind::Int64, tokens.device())).view([1, keys]);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = lm.cfg.sliding_window {
        allowed = allowed.logical_and(&(&q - &k).lt(w as i64));
    }
    let mask = AttnMask::Explicit(allowed.view([n, 1, 1, keys]));
    let hidden =
        lm.forward_with_mask(&lm.embed(&tokens.view([n, 1])), &q, &mask, Some(&mut cache.decode(writes, keys)));
    lm.logits(&hidden).squeeze_dim(1).to_kind(Kind::Float)
}

/// Cache positions that fit in `gpu_memory_fraction` of the GPU beside what the model holds now and the step's
/// workspace. None (sized as the rows need) when the memory cannot be read.
fn gpu_budget(model: &LlavaNext, opts: &EngineOptions) -> Result<Option<usize>> {
    if !(opts.gpu_memory_fraction > 0.0 && opts.gpu_memory_fraction <= 1.0) {
        return Err(Error::Input(format!("--gpu-memory-fraction {} must be in (0, 1]", opts.gpu_memory_fraction)));
    }
    let device = model.device();
    let (total, reserved, device_free) = match cuda_graph::memory(device) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot read the GPU's memory ({e}): the cache grows as the rows need; set --max-batch-tokens to bound it");
            return Ok(None);
        }
    };
    let allowed = (total as f64 * opts.gpu_memory_fraction) as u64;
    // The fraction counts the whole device, but the CUDA context and other processes hold part of it: never
    // plan for more than the driver reports free.
    let free = allowed.saturating_sub(reserved).min(device_free).saturating_sub(WORKSPACE_BYTES);
    let per_token = bytes_per_token(&model.language_model.cfg, model.kind()) as u64;
    let tokens = (free / per_token) as usize;
    if tokens == 0 {
        return Err(Error::Input(format!(
            "no GPU memory left for the key/value cache: {:.1} GiB of {:.1} GiB allowed by --gpu-memory-fraction {} are taken by the model \
             and {:.0} GiB of workspace, and the device has {:.1} GiB free (other processes hold the rest); raise the \
             fraction, free the device or give --max-batch-tokens",
            reserved as f64 / 2f64.powi(30),
            allowed as f64 / 2f64.powi(30),
            opts.gpu_memory_fraction,
            WORKSPACE_BYTES as f64 / 2f64.powi(30),
            device_free as f64 / 2f64.powi(30)
        )));
    }
    Ok(Some(tokens))
}

impl<T> Drop for Engine<'_, T> {
    fn drop(&mut self) {
        // Graphs hold pointers into the cache: release them first.
        self.graphs = None;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::generate::session::Session;
    use rand::{Rng, SeedableRng};
    use tch::Device;

    /// The tiny random model with its embeddings and output layer scaled up, so that its greedy and sampled
    /// tokens depend on the prompt (at the init scale its logits are nearly flat and it repeats one token).
    pub(crate) fn tiny_session() -> (tempfile::TempDir, Session) {
        let dir = tempfile::tempdir().unwrap();
        crate::model::tiny::write_tiny_model(dir.path(), 7).unwrap();
        let session = Session::load(dir.path(), None, None, Kind::Float, Device::Cpu).unwrap();
        tch::no_grad(|| {
            let lm = &session.model.language_model;
            let _ = lm.embed_tokens.shallow_clone().g_mul_scalar_(40.0);
            let _ = lm.lm_head.weight.shallow_clone().g_mul_scalar_(40.0);
        });
        (dir, session)
    }

    struct Case {
        ids: Vec<i64>,
        /// (seed of the feature values, features) per image placeholder run
        image: Option<u64>,
        max_new_tokens: usize,
    }

    const IMAGE_TOKENS: usize = 40;

    fn request(session: &Session, case: &Case, row_seed: u64) -> Request {
        let image_id = crate::text::tokenizer::IMAGE_TOKEN_INDEX;
        let hidden = session.model.cfg.text.hidden_size as i64;
        let (ids, features, images) = match case.image {
            Some(seed) => {
                let mut ids = vec![1, 733, 16289, 28793];
                ids.extend(std::iter::repeat_n(image_id, IMAGE_TOKENS));
                ids.extend(&case.ids);
                tch::manual_seed(seed as i64);
                let features = Tensor::randn([IMAGE_TOKENS as i64, hidden], (Kind::Float, Device::Cpu));
                let key = ImageKey::of(&::image::RgbImage::from_pixel(1, 1, ::image::Rgb([seed as u8, 0, 0])));
                (ids, vec![features], vec![key])
            }
            None => (case.ids.clone(), Vec::new(), Vec::new()),
        };
        Request {
            prompt: PreparedPrompt { ids, image_features: features },
            images,
            row_seed,
            max_new_tokens: case.max_new_tokens,
        }
    }

    fn run(
        session: &Session,
        cases: &[Case],
        sampling: &SamplingConfig,
        eos: i64,
        opts: EngineOptions,
    ) -> (Vec<Vec<i64>>, EngineStats) {
        let mut engine: Engine<usize> = Engine::new(&session.model, sampling.clone(), vec![eos], opts).unwrap();
        for (i, case) in cases.iter().enumerate() {
            engine.submit(i, request(session, case, 1000 + i as u64)).map_err(|_| "refused").unwrap();
        }
        let mut out = vec![Vec::new(); cases.len()];
        let mut steps = 0;
        while !engine.is_idle() {
            for (i, generated) in engine.step().unwrap() {
                assert_eq!(generated.prompt_tokens, request(session, &cases[i], 0).prompt.ids.len());
                out[i] = generated.tokens;
            }
            steps += 1;
            assert!(steps < 10_000, "the engine makes no progress");
        }
        (out, engine.stats.clone())
    }

    fn serial(session: &Session, cases: &[Case], sampling: &SamplingConfig, eos: i64) -> Vec<Vec<i64>> {
        (0..cases.len())
            .map(|i| {
                let opts = EngineOptions { slots: BatchSize::Rows(1), ..Default::default() };
                let mut engine: Engine<()> = Engine::new(&session.model, sampling.clone(), vec![eos], opts).unwrap();
                engine.submit((), request(session, &cases[i], 1000 + i as u64)).map_err(|_| "refused").unwrap();
                let mut out = None;
                while !engine.is_idle() {
                    out = engine.step().unwrap().pop().map(|x| x.1.tokens).or(out);
                }
                out.unwrap()
            })
            .collect()
    }

    fn cases() -> Vec<Case> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut words = |n: usize| -> Vec<i64> { (0..n).map(|_| rng.random_range(3..32000)).collect() };
        let system = words(50);
        let with_system = |suffix: Vec<i64>| [vec![1], system.clone(), suffix].concat();
        vec![
            Case { ids: with_system(words(9)), image: None, max_new_tokens: 9 },
            Case { ids: words(3), image: Some(1), max_new_tokens: 4 },
            Case { ids: words(5), image: Some(1), max_new_tokens: 12 },
            Case { ids: with_system(words(4)), image: None, max_new_tokens: 3 },
            // the same text as the last one but with another image: must not share its prefix
            Case { ids: vec![], image: Some(2), max_new_tokens: 7 },
            Case { ids: [vec![1], words(300)].concat(), image: None, max_new_tokens: 5 },
            Case { ids: words(6), image: Some(1), max_new_tokens: 1 },
            Case { ids: with_system(words(20)), image: None, max_new_tokens: 10 },
            Case { ids: vec![], image: Some(1), max_new_tokens: 6 },
        ]
    }

    #[test]
    fn engine_output_equals_one_by_one_under_every_reshaping() {
        let (_dir, session) = tiny_session();
        let cases = cases();
        let greedy = SamplingConfig::default();
        let sampled = SamplingConfig { temperature: 1.0, top_p: 0.9, top_k: 20, seed: 3, ..Default::default() };
        for sampling in [&greedy, &sampled] {
            // EOS is a token the serial run writes part-way, so that rows stop at different steps
            let reference = serial(&session, &cases, sampling, -1);
            let eos = reference[2][5];
            let expected = serial(&session, &cases, sampling, eos);
            let lengths: std::collections::BTreeSet<usize> = expected.iter().map(Vec::len).collect();
            assert!(lengths.len() >= 4, "rows should stop at different steps: {expected:?}");
            let distinct: std::collections::BTreeSet<&Vec<i64>> = expected.iter().collect();
            assert!(distinct.len() >= 6, "the tiny model should not write the same for every prompt: {expected:?}");
            for opts in [
                EngineOptions { slots: BatchSize::Rows(3), prefill_chunk: 16, ..Default::default() },
                EngineOptions { slots: BatchSize::Rows(8), prefill_chunk: 7, ..Default::default() },
                EngineOptions { slots: BatchSize::Rows(2), max_batch_tokens: Some(900), ..Default::default() },
                EngineOptions { slots: BatchSize::Auto, max_batch_tokens: Some(4000), ..Default::default() },
            ] {
                let (got, stats) = run(&session, &cases, sampling, eos, opts.clone());
                assert_eq!(got, expected, "{opts:?}");
                assert!(stats.reused_prefix_tokens >= 44, "prefixes shared: {stats:?}");
                assert!(
                    stats.cache_budget.is_none_or(|b| stats.cache_slots * (stats.cache_capacity + 1) <= b),
                    "{stats:?}"
                );
            }
            let prompts: Vec<PreparedPrompt> =
                cases.iter().enumerate().map(|(i, c)| request(&session, c, i as u64).prompt).collect();
            let seeds: Vec<u64> = (0..cases.len()).map(|i| 1000 + i as u64).collect();
            let limits: Vec<usize> = cases.iter().map(|c| c.max_new_tokens).collect();
            let (outputs, _) =
                super::super::static_batch::generate(&session.model, &prompts, &seeds, &limits, sampling, &[eos], 0)
                    .unwrap();
            assert_eq!(outputs.into_iter().map(|o| o.tokens).collect::<Vec<_>>(), expected, "static batches");
        }
    }

    #[test]
    fn prompts_that_do_not_fit_are_refused() {
        let (_dir, mut session) = tiny_session();
        let context = 200;
        session.model.cfg.text.max_position_embeddings = context;
        let mut engine: Engine<()> = Engine::new(
            &session.model,
            SamplingConfig::default(),
            Vec::new(),
            EngineOptions { max_batch_tokens: Some(100), ..Default::default() },
        )
        .unwrap();
        let prompt = |n: usize| PreparedPrompt { ids: vec![5; n], image_features: Vec::new() };
        let long = Request { prompt: prompt(context), images: Vec::new(), row_seed: 0, max_new_tokens: 4 };
        assert!(matches!(engine.submit((), long), Err(Refusal::TooLong(_))));
        let big = Request { prompt: prompt(90), images: Vec::new(), row_seed: 0, max_new_tokens: 20 };
        match engine.submit((), big) {
            Err(Refusal::CannotFit(e)) => assert!(e.to_string().contains("--max-batch-tokens"), "{e}"),
            other => panic!("{other:?}"),
        }
        // near the context: the row stops there, and says so
        let mut engine: Engine<()> =
            Engine::new(&session.model, SamplingConfig::default(), Vec::new(), EngineOptions::default()).unwrap();
        engine
            .submit((), Request { prompt: prompt(context - 3), images: Vec::new(), row_seed: 0, max_new_tokens: 10 })
            .unwrap();
        let mut out = Vec::new();
        while !engine.is_idle() {
            out.extend(engine.step().unwrap());
        }
        assert_eq!((out[0].1.tokens.len(), out[0].1.stop), (3, StopReason::Context));
        assert_eq!(engine.stats.cuda_graphs_off.as_deref(), Some("cpu device"), "the summary says why no graphs");
    }

    #[test]
    fn auto_batch_size_fills_the_cache_budget() {
        let (_dir, session) = tiny_session();
        let case = Case { ids: vec![5; 20], image: Some(1), max_new_tokens: 8 };
        let engine_with = |slots, max_batch_tokens| {
            let opts = EngineOptions { slots, max_batch_tokens, ..Default::default() };
            Engine::<usize>::new(&session.model, SamplingConfig::default(), Vec::new(), opts).unwrap()
        };
        let sized = |mut engine: Engine<usize>| {
            assert_eq!(engine.rows(), if engine.opts.slots == BatchSize::Auto { 1 } else { engine.max_rows });
            engine.submit(0, request(&session, &case, 0)).map_err(|_| "refused").unwrap();
            let planned = engine.rows();
            while !engine.is_idle() {
                engine.step().unwrap();
            }
            assert_eq!(engine.stats.cache_slots, planned, "rows() announces the slots the cache gets");
            (planned, engine.stats.cache_capacity, engine.feature_positions)
        };
        // no budget (the CPU without --max-batch-tokens): 8
        assert_eq!(sized(engine_with(BatchSize::Auto, None)).0, UNBUDGETED_AUTO_ROWS);
        // a budget: as many rows as it holds, each with its image features' share
        let budget = 200_000;
        let (rows, capacity, feature_positions) = sized(engine_with(BatchSize::Auto, Some(budget)));
        assert!(feature_positions > 0);
        assert_eq!(rows, budget / (capacity + 1 + feature_positions));
        assert!(rows > UNBUDGETED_AUTO_ROWS, "{rows} rows in {budget} positions of {capacity}");
        assert_eq!(sized(engine_with(BatchSize::Auto, Some(10_000_000))).0, AUTO_MAX_ROWS);
        // a fixed size stays as it was: the budget only lowers it
        assert_eq!(sized(engine_with(BatchSize::Rows(3), Some(budget))).0, 3);
        assert_eq!(sized(engine_with(BatchSize::Rows(64), Some(budget))).0, (budget / (capacity + 1)).min(64));
    }

    #[test]
    fn batch_sizes_parse_from_flags_and_profiles() {
        assert_eq!("auto".parse::<BatchSize>(), Ok(BatchSize::Auto));
        assert_eq!("12".parse::<BatchSize>(), Ok(BatchSize::Rows(12)));
        for bad in ["0", "-1", "eight", ""] {
            let err = bad.parse::<BatchSize>().unwrap_err();
            assert!(err.contains("number of rows (at least 1) or auto"), "{err}");
        }
        let yaml: Vec<BatchSize> = serde_yaml::from_str("[auto, 8]").unwrap();
        assert_eq!(yaml, [BatchSize::Auto, BatchSize::Rows(8)]);
        assert!(serde_yaml::from_str::<BatchSize>("0").is_err());
        assert_eq!(serde_json::to_string(&yaml).unwrap(), r#"["auto",8]"#);
    }
}
