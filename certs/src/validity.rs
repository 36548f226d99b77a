//! Validity periods of certificates and CRLs.

use time::{Duration, OffsetDateTime};

use crate::Error;

/// How far in the past a fresh validity period starts, to tolerate clocks that run a
/// little behind the machine that minted the certificate.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// A validity period: `not_before ..= not_after`, in UTC.
///
/// Times are kept to whole seconds (sub-second precision is dropped on construction),
/// since that is all X.509 encodes: the period you ask for is the one in the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    /// A period from `not_before` to `not_after`; refuses one that ends before it starts.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, Error> {
        let (not_before, not_after) = (whole_seconds(not_before), whole_seconds(not_after));
        if not_after <= not_before {
            return Err(Error::InvalidValidity {
                not_before,
                not_after,
            });
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// Valid for `days` days from now, starting [`CLOCK_SKEW`] in the past.
    ///
    /// `days` is a `u16` (at most ~179 years), so the end date always fits.
    pub fn days(days: u16) -> Self {
        Self::days_from(OffsetDateTime::now_utc(), days)
    }

    /// Like [`Validity::days`] but counted from `now` instead of the system clock.
    pub fn days_from(now: OffsetDateTime, days: u16) -> Self {
        let now = whole_seconds(now);
        Self {
            not_before: now.saturating_sub(CLOCK_SKEW),
            // At least one second past the start, even for `days == 0` at the end of time.
            not_after: now.saturating_add(Duration::days(i64::from(days))).max(
                now.saturating_sub(CLOCK_SKEW)
                    .saturating_add(Duration::seconds(1)),
            ),
        }
    }

    /// A period that ended yesterday (it started the day before), for tests that need an
    /// expired certificate or CRL.
    pub fn expired() -> Self {
        let now = whole_seconds(OffsetDateTime::now_utc());
        Self {
            not_before: now - Duration::days(2),
            not_after: now - Duration::days(1),
        }
    }

    /// A period that starts tomorrow and lasts a day, for tests that need a certificate
    /// that is not valid yet.
    pub fn not_yet_valid() -> Self {
        let now = whole_seconds(OffsetDateTime::now_utc());
        Self {
            not_before: now + Duration::days(1),
            not_after: now + Duration::days(2),
        }
    }

    /// Start of the period.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the period.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Whether `at` lies within the period.
    pub fn contains(&self, at: OffsetDateTime) -> bool {
        self.not_before <= at && at <= self.not_after
    }

    /// This period cut so that it ends no later than `outer` (a certificate is useless
    /// once its issuer has expired). Fails if nothing of the period is left.
    pub fn clamped_to(&self, outer: &Validity) -> Result<Self, Error> {
        Self::new(self.not_before, self.not_after.min(outer.not_after))
    }
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    // 0 is always a valid nanosecond value, so this never falls back.
    t.replace_nanosecond(0).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_starts_in_the_past() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let v = Validity::days_from(now, 10);
        assert_eq!(v.not_before(), now - CLOCK_SKEW);
        assert_eq!(v.not_after(), now + Duration::days(10));
        assert!(v.contains(now));
        let v = Validity::days_from(now + Duration::milliseconds(300), 1);
        assert_eq!(v.not_before(), now - CLOCK_SKEW, "whole seconds");
    }

    #[test]
    fn zero_days_is_still_a_period() {
        let v = Validity::days(0);
        assert!(v.not_after() > v.not_before());
    }

    #[test]
    fn expired_and_future() {
        let now = OffsetDateTime::now_utc();
        assert!(Validity::expired().not_after() < now);
        assert!(Validity::not_yet_valid().not_before() > now);
    }

    #[test]
    fn new_refuses_backwards() {
        let now = OffsetDateTime::now_utc();
        assert!(Validity::new(now, now).is_err());
        assert!(Validity::new(now, now - Duration::seconds(1)).is_err());
        assert!(Validity::new(now, now + Duration::seconds(1)).is_ok());
    }

    #[test]
    fn clamping() {
        let now = OffsetDateTime::now_utc();
        let ca = Validity::days_from(now, 10);
        let leaf = Validity::days_from(now, 20);
        assert_eq!(leaf.clamped_to(&ca).unwrap().not_after(), ca.not_after());
        let short = Validity::days_from(now, 5);
        assert_eq!(short.clamped_to(&ca).unwrap(), short);
        assert!(leaf.clamped_to(&Validity::expired()).is_err());
    }
}
