pub mod benchmarks;
mod hub_parquet;
pub mod judge;
pub mod metrics;
pub mod run;
