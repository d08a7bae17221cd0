//! Picking the next token from logits: greedy, or seeded temperature + top-p.
//!
//! Every backend hands its logits to the same host sampler, so equal logits
//! give equal tokens whatever computed them.

use super::SplitMix64;

/// How to pick tokens, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 disables it.
    pub top_p: f32,
    /// The sampler's seed.
    pub seed: u64,
}

/// Why sampling parameters are refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature not finite or negative.
    #[error("temperature {0} must be finite and >= 0")]
    Temperature(f32),
    /// Top-p outside `(0, 1]`.
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
}

impl SamplingParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// A sequence's sampler: its parameters and its own random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler; `params` must have passed [`SamplingParams::validate`].
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: SplitMix64::new(params.seed),
            scratch: Vec::new(),
        }
    }

    /// The next token. Greedy picks the lowest index among equal maxima; a
    /// NaN logit never wins.
    #[allow(clippy::cast_possible_truncation)] // vocabularies are far below u32::MAX
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        self.scratch.clear();
        let mut total = 0.0f32;
        for (i, &l) in logits.iter().enumerate() {
            let p = if l.is_nan() {
                0.0
            } else {
                ((l - max) * inv_t).exp()
            };
            total += p;
            self.scratch.push((p, i as u32));
        }
        // Highest probability first; equal ones by index, so the order is total.
        self.scratch
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut keep = self.scratch.len();
        if self.params.top_p < 1.0 {
            let cut = self.params.top_p * total;
            let mut acc = 0.0f32;
            for (n, &(p, _)) in self.scratch.iter().enumerate() {
                acc += p;
                if acc >= cut {
                    keep = n + 1;
                    break;
                }
            }
        }
        let kept = &self.scratch[..keep];
        let mass: f32 = kept.iter().map(|&(p, _)| p).sum();
        let target = self.rng.next_f32() * mass;
        let mut acc = 0.0f32;
        for &(p, token) in kept {
            acc += p;
            if target < acc {
                return token;
            }
        }
        kept.last().map_or(0, |&(_, t)| t)
    }
}

/// Index of the largest logit (lowest index on ties; NaN never wins).
#[allow(clippy::cast_possible_truncation)]
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_v {
            best = i;
            best_v = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_lowest_index_of_the_maximum() {
        let mut s = Sampler::new(params(0.0, 1.0, 1));
        assert_eq!(s.sample(&[0.5, 2.0, 2.0, f32::NAN]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..64u8).map(|i| f32::from(i % 7) * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, seed));
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // One token holds ~88% of the mass: top_p 0.5 must always pick it.
        let mut logits = vec![0.0f32; 16];
        logits[3] = 5.0;
        let mut s = Sampler::new(params(1.0, 0.5, 3));
        assert!((0..500).all(|_| s.sample(&logits) == 3));
        let mut s = Sampler::new(params(1.0, 1.0, 3));
        assert!((0..500).any(|_| s.sample(&logits) != 3));
    }

    #[test]
    fn ranges_are_checked() {
        assert!(params(-1.0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 0.95, 0).validate().is_ok());
    }
}
