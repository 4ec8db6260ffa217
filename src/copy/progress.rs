//! Progress of the copy: one indicatif bar per table being copied when stderr is a terminal
//! (rows, bytes, rate, ETA from the source's `pg_class.reltuples`), plain log lines every few
//! seconds otherwise (CI logs, `setup ... 2> file`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain log line reports a table still being copied.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// How often a bar is updated: counting happens per row, drawing ten times a second (updating
/// the bar for every row costs more than copying it).
const BAR_EVERY: Duration = Duration::from_millis(100);

/// `{rate}`: rows per second, without decimals.
fn rate_key(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.0} rows/s", state.per_sec());
}

/// Where progress goes.
#[derive(Clone)]
pub enum Progress {
    /// Bars on the terminal.
    Bars(MultiProgress),
    /// `tracing` lines.
    Lines,
}

impl Progress {
    /// Bars when stderr is a terminal, else log lines.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines
        }
    }

    /// Starts reporting one table; `estimate` is the expected row count, if known.
    pub fn start(&self, label: String, estimate: Option<u64>) -> TableProgress {
        let bar = match self {
            Progress::Bars(multi) => {
                let bar = match estimate {
                    Some(n) if n > 0 => {
                        let bar = ProgressBar::new(n);
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:40!} [{bar:25}] {human_pos}/~{human_len} rows, {msg}, \
                                 {rate}, eta {eta}",
                            )
                            .map(|s| s.with_key("rate", rate_key))
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        bar
                    }
                    _ => {
                        let bar = ProgressBar::new_spinner();
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:40!} {spinner} {human_pos} rows, {msg}, {rate}",
                            )
                            .map(|s| s.with_key("rate", rate_key))
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar
                    }
                };
                bar.set_prefix(label.clone());
                bar.set_message(human_bytes(0));
                let bar = multi.add(bar);
                bar.enable_steady_tick(Duration::from_millis(200));
                Some(bar)
            }
            Progress::Lines => {
                tracing::info!(table = %label, estimated_rows = ?estimate, "copying");
                None
            }
        };
        let now = Instant::now();
        TableProgress {
            label,
            estimate,
            bar,
            rows: 0,
            bytes: 0,
            started: now,
            last_line: now,
        }
    }
}

/// One table's progress.
pub struct TableProgress {
    label: String,
    estimate: Option<u64>,
    bar: Option<ProgressBar>,
    rows: u64,
    bytes: u64,
    started: Instant,
    last_line: Instant,
}

impl TableProgress {
    /// Counts one more chunk of `rows` rows and `bytes` bytes.
    pub fn add(&mut self, rows: u64, bytes: u64) {
        self.rows += rows;
        self.bytes += bytes;
        match &self.bar {
            Some(bar) => {
                if self.last_line.elapsed() < BAR_EVERY {
                    return;
                }
                self.last_line = Instant::now();
                bar.set_position(self.rows);
                if let Some(len) = bar.length() {
                    if self.rows > len {
                        // The estimate was low (reltuples is a sample): stretch the bar.
                        bar.set_length(self.rows + self.rows / 10);
                    }
                }
                bar.set_message(human_bytes(self.bytes));
            }
            None => {
                if self.last_line.elapsed() >= LINE_EVERY {
                    self.last_line = Instant::now();
                    let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                    let rate = self.rows as f64 / secs;
                    let eta = self
                        .estimate
                        .filter(|n| *n > self.rows && rate > 0.0)
                        .map(|n| format!("{:.0}s", (n - self.rows) as f64 / rate))
                        .unwrap_or_else(|| "?".to_string());
                    tracing::info!(
                        table = %self.label,
                        rows = self.rows,
                        estimated_rows = ?self.estimate,
                        bytes = %human_bytes(self.bytes),
                        rows_per_second = rate.round(),
                        eta = %eta,
                        "copying"
                    );
                }
            }
        }
    }

    /// The table is done (`rows` as the server counted them).
    pub fn finish(self, rows: u64) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        tracing::info!(
            table = %self.label,
            rows,
            bytes = %human_bytes(self.bytes),
            seconds = format!("{secs:.1}"),
            "copied"
        );
    }

    /// The table was abandoned (error or interruption).
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn line_mode_counts_without_a_terminal() {
        let p = Progress::Lines;
        let mut t = p.start("public.t -> west".into(), Some(10));
        t.add(4, 100);
        t.add(6, 150);
        assert_eq!((t.rows, t.bytes), (10, 250));
        t.finish(10);
    }
}
