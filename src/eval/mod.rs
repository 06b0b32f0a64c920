pub mod benchmarks;
pub mod judge;
pub mod metrics;
pub mod run;
