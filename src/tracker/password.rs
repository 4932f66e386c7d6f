//! Password hashing: Argon2id with a random salt per password, as PHC strings.
//!
//! The clear password exists only in the request that carries it; what the state stores and
//! replicates is the PHC string. Hashing is deliberately slow (about 9 ms and 8 MiB per hash
//! with these parameters), so the tracker core never calls it on the reactor thread: it emits a
//! [`PasswordJob`] which the driver runs on a worker thread, and the [`PasswordResult`] comes
//! back as an event.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::wire::Password;

/// Work the core hands out: hash a new password, or check one against its stored hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordJob {
    Hash { password: Password },
    Verify { password: Password, phc: String },
}

/// The answer to a [`PasswordJob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordResult {
    /// The PHC string, or `None` if the system's random source failed.
    Hashed(Option<String>),
    Verified(bool),
}

/// Does the (slow) work of a job.
pub fn run(job: &PasswordJob) -> PasswordResult {
    match job {
        PasswordJob::Hash { password } => PasswordResult::Hashed(hash(password)),
        PasswordJob::Verify { password, phc } => PasswordResult::Verified(verify(password, phc)),
    }
}

/// Memory cost in KiB, passes, lanes.
const M_COST_KIB: u32 = 8 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn hasher() -> Argon2<'static> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A fresh salted hash of `password`, or `None` if the system's random source failed.
pub fn hash(password: &Password) -> Option<String> {
    hasher()
        .hash_password(password.as_bytes())
        .ok()
        .map(|h| h.to_string())
}

/// Whether `password` matches the stored PHC string.
pub fn verify(password: &Password, phc: &str) -> bool {
    hasher().verify_password(password.as_bytes(), phc).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_salted_and_verifies() {
        let pw = Password::new(b"s3cret pass").unwrap();
        let a = hash(&pw).unwrap();
        let b = hash(&pw).unwrap();
        assert_ne!(a, b, "two hashes of one password differ by salt");
        assert!(!a.contains("s3cret"));
        assert!(a.starts_with("$argon2id$"));
        assert!(verify(&pw, &a));
        assert!(!verify(&Password::new(b"other").unwrap(), &a));
        assert!(!verify(&pw, "not a phc string"));
    }
}
