//! The console sink: where guest serial output goes (stdout or a file).
//!
//! The UART and the MMIO debug device both write here, so the guest's output appears as one
//! stream whichever path it used.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A cloneable, thread-safe writer for guest console output.
#[derive(Clone)]
pub struct Console {
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl Console {
    /// Console output to the VMM's stdout.
    pub fn stdout() -> Self {
        Self::from_writer(Box::new(io::stdout()))
    }

    /// Console output appended to a file (created if missing).
    pub fn file(path: &Path) -> io::Result<Self> {
        let f = File::options().create(true).append(true).open(path)?;
        Ok(Self::from_writer(Box::new(f)))
    }

    /// Console output to any writer.
    pub fn from_writer(w: Box<dyn Write + Send>) -> Self {
        Console {
            sink: Arc::new(Mutex::new(w)),
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sink = self
            .sink
            .lock()
            .map_err(|_| io::Error::other("console lock poisoned"))?;
        sink.write_all(buf)?;
        // Guest output is line-oriented and read live by people and programs: flush each line.
        if buf.contains(&b'\n') {
            sink.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink
            .lock()
            .map_err(|_| io::Error::other("console lock poisoned"))?
            .flush()
    }
}
