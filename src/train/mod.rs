pub mod data;
pub mod dpo;
pub mod forward;
pub mod optim;
pub mod trainer;
pub mod validate;
pub mod sft;
