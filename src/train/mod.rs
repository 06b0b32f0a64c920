pub mod data;
pub mod dpo;
pub mod forward;
pub mod optim;
pub mod packing;
pub mod trainer;
pub mod validate;
pub mod sft;
