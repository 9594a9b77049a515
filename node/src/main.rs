//! `tidepool-node`: a pool peer. Signaling and the chunk pipeline arrive with the node issues;
//! until then the binary only reports that it is not built yet.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "tidepool-node {}: not implemented yet (see the node issues)",
        env!("CARGO_PKG_VERSION")
    )
}
