//! Logging to stderr, plain for a terminal or a file, and with each line's level for journald.
//!
//! Under systemd, stderr is a stream to journald (`$JOURNAL_STREAM` names it). journald reads
//! a `<N>` prefix on a line as its syslog priority (sd-daemon(3)), so an error is priority 3
//! and `journalctl -p warning -u carpulse` shows warnings and errors only; without the prefix
//! every line is priority 6 (info). There the timestamp is left to the journal. Written out (a
//! few lines on top of tracing-subscriber's formatter) rather than pulled in as a crate.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The syslog priority journald files a line of this level under.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the journald stream systemd connected (`$JOURNAL_STREAM` is
/// `device:inode` of it), not merely inherited by a child of the service.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// Puts `<priority>` before what the inner formatter writes.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the global subscriber: `RUST_LOG`, else `default`.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A log write that fails (stderr's reader is gone) is dropped; reporting it would write to
    // the same broken stderr and panic, killing whichever task logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        builder
            .with_ansi(false)
            .event_format(Journald(format))
            .init();
    } else {
        // Colours only on a terminal: log files get plain text.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// The last words of a failed command, with the priority prefix under journald.
pub fn fatal(message: &str) {
    use std::io::Write;
    let prefix = if stderr_is_journal() { "<3>" } else { "" };
    // Not eprintln!: with stderr's reader gone it would panic, and the exit code would be
    // 101 instead of the one that says what failed.
    let _ = writeln!(std::io::stderr(), "{prefix}carpulse: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
