//! Live migration: the wire protocol, authentication, the two-channel transport, the source and
//! destination protocol drivers, and (in `postcopy`) the destination's userfaultfd memory engine.
//! See docs/protocol.md (the wire format, the state machines, recovery) and docs/architecture.md
//! (the postcopy engine's modules and the fault path).

pub mod auth;
pub mod cpu_placement;
pub mod destination;
pub mod latency;
pub mod live_stats;
pub mod liveness;
pub mod postcopy;
pub mod relay;
pub mod source;
pub mod stats;
pub mod sync;
pub mod thread_hook;
pub mod thread_priority;
pub mod tls;
pub mod transport;
pub mod types;
pub mod urgent_client;
pub mod vocab;
pub mod wire;

pub use auth::Secret;
pub use destination::{listen, DestinationVm, IncomingMigration, Listener, PostcopySink};
pub use live_stats::{
    EventSink, MigrationEvent, MigrationInfo, MigrationStatus, RamInfo, ReceiveMonitor,
};
pub use source::{migrate, CancelError, MigrateOptions, MigrationControl, Progress, SourceVm};
pub use stats::{MigrationSummary, ReceiveSummary};
pub use transport::Timeouts;
pub use types::{
    Backing, ChannelDown, DirtyLog, FetchError, Granularity, Mode, PageFetcher, RamRegion,
    PAGE_SIZE,
};
pub use types::{PageSet, RamLayout};
