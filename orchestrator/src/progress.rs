//! Progress display: a live bar on a terminal, plain periodic lines otherwise (logs, CI, pipes).
//!
//! Both show the same figures: step of total, epoch, recent loss, samples per second and the
//! estimated time left.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Plain lines are at most this frequent.
const LINE_PERIOD: Duration = Duration::from_secs(2);

/// Shows training progress on stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    rate: StepRate,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Steps per second from successive (time, step) observations, for the ETA.
#[derive(Debug, Default)]
struct StepRate {
    first: Option<(Instant, u64)>,
}

impl StepRate {
    /// Seconds left at the mean rate since the first step was seen, if it can be told yet.
    fn eta(&mut self, now: Instant, step: u64, total: u64) -> Option<Duration> {
        let (t0, s0) = *self.first.get_or_insert((now, step));
        let dt = now.duration_since(t0).as_secs_f64();
        let ds = step.saturating_sub(s0);
        (ds > 0 && dt > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(step) as f64 * dt / ds as f64))
    }
}

/// `1h02m`, `3m05s` or `42s`.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The line printed when stderr is not a terminal.
pub fn plain_line(step: u64, total: u64, epoch: u32, loss: f32, samples_per_s: f64, eta: Option<Duration>) -> String {
    let loss = if loss.is_finite() { format!("{loss:.4}") } else { "-".into() };
    let eta = eta.map(short_duration).unwrap_or_else(|| "-".into());
    format!("step {step}/{total}  epoch {epoch}  loss {loss}  {samples_per_s:.0} samples/s  ETA {eta}")
}

/// Whether stderr shows a live bar: a terminal that is not `TERM=dumb`.
fn live_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Progress {
        let bar = live_terminal().then(|| {
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len}  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        Progress { bar, last_line: None, rate: StepRate::default() }
    }

    /// New figures.
    pub fn update(&mut self, step: u64, total: u64, loss: f32, samples_per_s: f64, epoch: u32) {
        match &self.bar {
            Some(b) => {
                let loss = if loss.is_finite() { format!("{loss:.4}") } else { "-".into() };
                b.set_length(total);
                b.set_position(step);
                b.set_message(format!("epoch {epoch}  loss {loss}  {samples_per_s:.0} samples/s"));
            }
            None => {
                let now = Instant::now();
                let eta = self.rate.eta(now, step, total);
                if self.last_line.is_none_or(|t| now.duration_since(t) >= LINE_PERIOD) {
                    eprintln!("{}", plain_line(step, total, epoch, loss, samples_per_s, eta));
                    self.last_line = Some(now);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_carry_step_loss_rate_and_eta() {
        let l = plain_line(50, 200, 1, 0.25, 1234.4, Some(Duration::from_secs(65)));
        assert_eq!(l, "step 50/200  epoch 1  loss 0.2500  1234 samples/s  ETA 1m05s");
        assert_eq!(plain_line(0, 10, 0, f32::NAN, 0.0, None), "step 0/10  epoch 0  loss -  0 samples/s  ETA -");
        assert_eq!(short_duration(Duration::from_secs(3 * 3600 + 7 * 60 + 5)), "3h07m");
    }

    #[test]
    fn eta_follows_the_mean_step_rate() {
        let mut r = StepRate::default();
        let t0 = Instant::now();
        assert_eq!(r.eta(t0, 10, 110), None);
        let eta = r.eta(t0 + Duration::from_secs(2), 30, 110).expect("rate known");
        assert_eq!(eta.as_secs(), 8, "80 steps left at 10 steps/s");
    }
}
