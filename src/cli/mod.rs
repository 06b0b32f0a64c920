pub mod corrupt;
pub mod generate;
pub mod init_tiny;
pub mod model_args;
pub mod score;
pub mod train_dpo;
