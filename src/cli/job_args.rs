//! Flag blocks of the generation commands: the engine's (`generate`, `prefs`, `describe`, `eval`) and those of the
//! STIC generation jobs (`prefs`, `describe`).
use stic::generate::engine::{BatchSize, EngineOptions};
use stic::method::prefs::SticJobOptions;

/// How the generation engine batches and sizes its cache (`generate`, `prefs`, `describe`, `eval`).
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Rows generated together: the engine's slots (a row that stops gives its slot to the next prompt). auto:
    /// as many as the key/value cache budget holds at the rows' length (their image features counted), at most
    /// 256 (vLLM's default); on the CPU without --max-batch-tokens, 8.
    #[arg(long, default_value = "auto")]
    pub batch_size: BatchSize,
    /// Key/value cache positions for all rows together. Default: what --gpu-memory-fraction leaves on a GPU,
    /// as many as the rows need on the CPU. A prompt and its answer that need more stop the run (exit 2).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Share of the GPU's memory that the model, the cache and a step's work may take together.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// Prompt tokens prefilled per chunk; a longer prompt is prefilled over several steps, between decode steps
    /// (smaller chunks bound the step's memory and latency, at some cost in throughput).
    #[arg(long, default_value_t = 4096)]
    pub prefill_chunk: usize,
    /// Run decode steps eagerly on a GPU instead of replaying CUDA graphs.
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            slots: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            gpu_memory_fraction: self.gpu_memory_fraction,
            prefill_chunk: self.prefill_chunk,
            cuda_graphs: !self.no_cuda_graphs,
        }
    }
}

/// Sampling flags of the STIC generation jobs; unset values come from third_party/stic/prompts.json.
#[derive(clap::Args, Debug)]
pub struct JobSamplingArgs {
    /// Seed of the sampling and of the corruptions (each item's own seed derives from it and its position).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Most tokens per response (the official scripts').
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (the official scripts').
    #[arg(long, value_parser = super::values::temperature)]
    pub temperature: Option<f64>,
    /// Nucleus sampling's top-p. Default: the prompts file's, else 1 (off).
    #[arg(long, value_parser = super::values::top_p)]
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens. Default: the prompts file's, else 0 (off; transformers'
    /// `generate`, which the official scripts call, uses 50).
    #[arg(long)]
    pub top_k: Option<usize>,
}

/// The flags of the STIC generation jobs (`prefs`, `describe`) besides their inputs and output.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Process only the items whose position p in the list has p % N == I (join the outputs with
    /// `stic prefs-merge`). Under torchrun each rank takes shard RANK/WORLD_SIZE by itself.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Only the first N items of the list.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub sampling: JobSamplingArgs,
    /// Conversation template of the prompts. Default: what the official generate_pref.py picks from the model's
    /// name (mistral_instruct for a name with "mistral", chatml_direct with "v1.6-34b", llava_v1 with "v1").
    #[arg(long, value_parser = super::choices::value_enum::<stic::text::Template>())]
    pub template: Option<stic::text::Template>,
    #[command(flatten)]
    pub summary: super::summary::SummaryArgs,
}

impl JobArgs {
    pub fn options(&self) -> SticJobOptions {
        let sampling = &self.sampling;
        SticJobOptions {
            shard: self.shard.clone(),
            limit: self.limit,
            seed: sampling.seed,
            max_new_tokens: sampling.max_new_tokens,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            engine: self.engine.options(),
            template: self.template,
            print_summary: self.summary.json,
        }
    }
}
