//! `tidepool-tracker`: the WebSocket signaling tracker. The server itself arrives with the
//! tracker-core issue; until then the binary only reports that it is not built yet.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "tidepool-tracker {}: the tracker server is not implemented yet (see the tracker-core issue)",
        env!("CARGO_PKG_VERSION")
    )
}
