//! Bench (todo)
