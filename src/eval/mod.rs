//! Evaluation on the paper's seven benchmarks: one module per benchmark behind a common trait, the Python
//! semantics their official scorers rely on, the LLM judge, the generation tasks of `stic eval` and the whole run
//! (`pipeline`); the image distribution of the paper's Fig. 7 (`image_distribution`, `tsne`).
pub mod benchmarks;
pub mod dar;
pub mod files;
mod hub_parquet;
pub mod image_distribution;
pub mod item;
pub mod judge;
pub mod pipeline;
pub mod provenance;
pub mod python;
pub mod run;
pub mod tsne;
