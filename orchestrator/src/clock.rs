//! Time as a value. Decision logic (the registry's [`crate::registry::PNodeTable`]) takes `now`
//! as a [`Duration`] since an arbitrary origin instead of reading the clock, so a simulator can
//! drive it with simulated time and tests need no sleeps; the actors hold a [`Clock`].

use std::time::{Duration, Instant};

/// The wall clock, read as the time elapsed since it was made.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose time starts at zero now.
    pub fn start() -> Clock {
        Clock { origin: Instant::now() }
    }

    /// Time since the clock started.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::start()
    }
}
