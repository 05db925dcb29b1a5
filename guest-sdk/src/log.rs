//! Log lines for the app's author.
//!
//! ```
//! vp_guest_sdk::info!("added {} to the total", 5);
//! vp_guest_sdk::log::warn("the total is getting large");
//! ```
//!
//! In a guest each line goes to the host: into its log (target `vp::guest`)
//! and into the member's recent lines, which `vp-host logs <vp>` prints,
//! tagged with the slot of the message that wrote them. Every member runs the
//! same messages, so every member logs the same lines; logging changes no
//! state. The host keeps at most 64 lines per message and 4 KiB per line.
//! In native tests ([`crate::testing::TestApp`]) the lines are kept for
//! [`crate::testing::TestApp::take_log`].

/// How important a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Write one line at `level`.
pub fn write(level: Level, line: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::wasm::log(level as u32, line);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::capture_log(level, line);
}

/// Write one line at debug level.
pub fn debug(line: &str) {
    write(Level::Debug, line);
}

/// Write one line at info level.
pub fn info(line: &str) {
    write(Level::Info, line);
}

/// Write one line at warn level.
pub fn warn(line: &str) {
    write(Level::Warn, line);
}

/// Write one line at error level.
pub fn error(line: &str) {
    write(Level::Error, line);
}

/// Log a formatted line at debug level: `vp_guest_sdk::debug!("x = {x}")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Debug, &::std::format!($($arg)*)) };
}

/// Log a formatted line at info level: `vp_guest_sdk::info!("x = {x}")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, &::std::format!($($arg)*)) };
}

/// Log a formatted line at warn level: `vp_guest_sdk::warn!("x = {x}")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, &::std::format!($($arg)*)) };
}

/// Log a formatted line at error level: `vp_guest_sdk::error!("x = {x}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, &::std::format!($($arg)*)) };
}
