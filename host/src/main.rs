//! `vp-host`: the vp daemon and command-line tool.

use clap::Parser;

/// Run WebAssembly apps as virtual peers on volunteer machines.
#[derive(Debug, Parser)]
#[command(name = "vp-host", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
