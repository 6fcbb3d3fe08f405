//! Progress display: a live bar on a terminal, plain periodic lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Shows training progress on stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        Progress { bar, last_line: None }
    }

    /// New figures.
    pub fn update(&mut self, step: u64, total: u64, loss: f32, samples_per_s: f64, epoch: u32) {
        let msg = format!("epoch {epoch}  loss {loss:.4}  {samples_per_s:.0} samples/s");
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(step);
                b.set_message(msg);
            }
            None => {
                if self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    eprintln!("step {step}/{total}  {msg}");
                    self.last_line = Some(Instant::now());
                }
            }
        }
    }

    /// A line above the bar.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
