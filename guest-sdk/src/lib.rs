//! The vp guest SDK.
