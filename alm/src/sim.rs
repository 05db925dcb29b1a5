//! Sim (todo)
