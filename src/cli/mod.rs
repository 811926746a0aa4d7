//! The command line's own work beside `run`: the `buffer` commands ([`admin`]) and the
//! container health probe ([`probe`]). `main.rs` parses the arguments and maps results to exit
//! codes.

pub mod admin;
pub mod probe;
pub mod try_message;
