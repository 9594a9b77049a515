//! `tidepool-load-test`: load generator for the tracker and for whole pools. The modes arrive
//! with the load-test issues; until then the binary only reports that it is not built yet.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "tidepool-load-test {}: not implemented yet (see the load-test issues)",
        env!("CARGO_PKG_VERSION")
    )
}
