//! Bearer tokens: JWTs (RFC 7519) signed with EdDSA (RFC 8037) by the caller's own Ed25519 key
//! as registered on the ledger.
//!
//! Header `alg` = `EdDSA`, `kid` = principal id; claims `sub` = principal id, `aud` =
//! `consentry`, `iat`, `exp`, with a lifetime of at most 15 minutes by default (the operator
//! may allow up to 24 hours: `broker serve --max-token-lifetime`) and a small clock skew
//! allowed. The key that checks a token is the principal's current key on the ledger, so a key
//! rotation or a revocation takes effect for the next call, whatever the token's lifetime.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ledger::State;
use ledger::ids::{Role, Timestamp};
use ledger::note::SignerKey;
use serde::{Deserialize, Serialize};

/// The audience every token names.
pub const AUDIENCE: &str = "consentry";
/// The longest lifetime a token may have unless the operator allows more.
pub const MAX_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The longest lifetime any broker accepts (and `mint` makes).
pub const LONGEST_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Clock skew tolerated on `iat` and `exp`.
pub const LEEWAY_SECS: i64 = 60;

/// A token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The principal id.
    pub sub: String,
    /// Must be [`AUDIENCE`].
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// Not before (Unix seconds), if the token says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Principal id.
    pub id: String,
    /// Its role on the ledger.
    pub role: Role,
}

/// Why a token was refused. The message never echoes the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization: Bearer …` metadata.
    #[error("missing bearer token: send `authorization: Bearer <JWT>` (see `broker token`)")]
    Missing,
    /// Not a well-formed EdDSA JWT.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `kid` names no registered principal.
    #[error("unknown principal {0:?}")]
    UnknownPrincipal(String),
    /// The principal was revoked.
    #[error("principal {0:?} is revoked")]
    Revoked(String),
    /// The signature, audience, subject or times do not check out.
    #[error("token refused: {0}")]
    Invalid(String),
}

/// Mints a token for the key's principal, valid for `ttl` (at most 24 hours; a broker accepts
/// more than 15 minutes only where its operator allows it).
pub fn mint(key: &SignerKey, ttl: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(
        !ttl.is_zero() && ttl <= LONGEST_LIFETIME,
        "token lifetime must be between 1 s and 24 h"
    );
    let now = Timestamp::now().unix();
    let claims = Claims {
        nbf: None,
        sub: key.name().to_owned(),
        aud: AUDIENCE.to_owned(),
        iat: now,
        exp: now + ttl.as_secs() as i64,
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.name().to_owned());
    let der = key.pkcs8_der();
    let enc = EncodingKey::from_ed_der(&der);
    Ok(jsonwebtoken::encode(&header, &claims, &enc)?)
}

/// `15 minutes`, `8 hours`, `90 s`.
fn show_lifetime(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{} hour(s)", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{} minutes", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Extracts the token from an `authorization` metadata value.
/// The token of an `authorization` value and the principal it must name, if the value says:
/// `Bearer <JWT>`, or `Basic base64(<principal id>:<JWT>)` (for clients that only know a user
/// name and a password, such as the Flight SQL JDBC driver and the BI tools over it: the
/// password is a token from `broker token`, never a key; the user name must be the token's
/// principal).
pub fn credentials(value: Option<&str>) -> Result<(String, Option<String>), AuthError> {
    let v = value.ok_or(AuthError::Missing)?;
    let (scheme, rest) = v.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return bearer(Some(v)).map(|t| (t.to_owned(), None));
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .filter(|d| d.len() <= 8192)
        .and_then(|d| String::from_utf8(d).ok())
        .ok_or_else(|| AuthError::Malformed("Basic credentials are not base64 text".into()))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| AuthError::Malformed("Basic credentials are user:password".into()))?;
    if password.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok((password.trim().to_owned(), Some(user.to_owned())))
}

pub fn bearer(value: Option<&str>) -> Result<&str, AuthError> {
    let v = value.ok_or(AuthError::Missing)?;
    let (scheme, token) = v.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token.trim())
}

/// Checks a token against the ledger's current state at `now` (Unix seconds), with a lifetime
/// of at most `max_lifetime`.
pub fn verify(
    token: &str,
    state: &State,
    now: i64,
    max_lifetime: Duration,
) -> Result<Caller, AuthError> {
    if token.len() > 4096 {
        return Err(AuthError::Malformed("longer than 4096 bytes".into()));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::EdDSA {
        return Err(AuthError::Invalid(format!(
            "algorithm {:?}; only EdDSA is accepted",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| AuthError::Malformed("the header has no kid".into()))?;
    let principal = state
        .principal(&kid)
        .ok_or_else(|| AuthError::UnknownPrincipal(kid.clone()))?;
    if principal.revoked_at.is_some() {
        return Err(AuthError::Revoked(kid));
    }
    let key = DecodingKey::from_ed_der(&principal.key.public_bytes());
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "aud", "sub", "iat"]);
    v.sub = Some(kid.clone());
    // Times are checked below against `now`, with our own leeway.
    v.validate_exp = false;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map_err(|e| AuthError::Invalid(e.to_string()))?;
    let c = data.claims;
    // The claims are the caller's numbers: checked arithmetic only (i64::MAX once overflowed).
    if c.exp.saturating_add(LEEWAY_SECS) <= now {
        return Err(AuthError::Invalid("expired".into()));
    }
    if c.iat.saturating_sub(LEEWAY_SECS) > now {
        return Err(AuthError::Invalid("issued in the future".into()));
    }
    if c.nbf
        .is_some_and(|nbf| nbf.saturating_sub(LEEWAY_SECS) > now)
    {
        return Err(AuthError::Invalid("not valid yet (nbf)".into()));
    }
    let lifetime = c.exp.checked_sub(c.iat).unwrap_or(i64::MAX);
    if lifetime <= 0 || lifetime.unsigned_abs() > max_lifetime.as_secs() {
        return Err(AuthError::Invalid(format!(
            "lifetime must be positive and at most {} on this broker (its operator sets \
             it: broker serve --max-token-lifetime)",
            show_lifetime(max_lifetime)
        )));
    }
    Ok(Caller {
        id: kid,
        role: principal.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::entry::{Body, Entry, PrincipalRegistered, SignedEntry};

    fn state_with(keys: &[(&SignerKey, Role)]) -> State {
        let mut st = State::default();
        for (i, (k, role)) in keys.iter().enumerate() {
            let body = Body::PrincipalRegistered(PrincipalRegistered {
                id: ledger::ids::PrincipalId::new(k.name()).unwrap(),
                role: *role,
                key: k.verifier().to_text(),
                subject: None,
                display_name: None,
            });
            let entry = Entry {
                author: ledger::ids::PrincipalId::new(keys[0].0.name()).unwrap(),
                time: Timestamp::now(),
                body,
            };
            let signed = SignedEntry::sign(keys[0].0, entry);
            let (_, since) = st.signing_key(&signed.entry).unwrap();
            st.apply(signed.entry, i as u64, since, &|_| None).unwrap();
        }
        st
    }

    #[test]
    fn a_long_token_needs_the_operators_leave_and_revocation_still_ends_it() {
        let op = SignerKey::generate("op").unwrap();
        let alice = SignerKey::generate("alice").unwrap();
        let mut st = state_with(&[(&op, Role::Operator), (&alice, Role::Researcher)]);
        let now = Timestamp::now().unix();
        let eight_hours = Duration::from_secs(8 * 3600);
        let t = mint(&alice, eight_hours).unwrap();
        // Refused by default, naming the broker's maximum and how to change it.
        match verify(&t, &st, now, MAX_LIFETIME) {
            Err(AuthError::Invalid(m)) => {
                assert!(
                    m.contains("15 minutes") && m.contains("--max-token-lifetime"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Accepted where the operator allows it, for its whole life.
        assert!(verify(&t, &st, now, eight_hours).is_ok());
        assert!(verify(&t, &st, now + 7 * 3600, eight_hours).is_ok());
        assert!(verify(&t, &st, now + 8 * 3600 + LEEWAY_SECS + 1, eight_hours).is_err());
        // Nobody mints past 24 hours.
        assert!(mint(&alice, Duration::from_secs(24 * 3600 + 1)).is_err());
        // A revocation ends the long token at the next call.
        let entry = Entry {
            author: ledger::ids::PrincipalId::new("op").unwrap(),
            time: Timestamp::now(),
            body: Body::PrincipalRevoked(ledger::entry::PrincipalRevoked {
                id: ledger::ids::PrincipalId::new("alice").unwrap(),
                reason: None,
            }),
        };
        let signed = SignedEntry::sign(&op, entry);
        let (_, since) = st.signing_key(&signed.entry).unwrap();
        st.apply(signed.entry, 2, since, &|_| None).unwrap();
        assert_eq!(
            verify(&t, &st, now, eight_hours),
            Err(AuthError::Revoked("alice".into()))
        );
    }

    fn forge(key: &SignerKey, kid: &str, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&key.pkcs8_der())).unwrap()
    }

    #[test]
    fn tokens_are_checked_against_the_ledger() {
        let op = SignerKey::generate("op").unwrap();
        let alice = SignerKey::generate("alice").unwrap();
        let st = state_with(&[(&op, Role::Operator), (&alice, Role::Researcher)]);
        let now = Timestamp::now().unix();

        let t = mint(&alice, Duration::from_secs(600)).unwrap();
        assert_eq!(
            verify(&t, &st, now, MAX_LIFETIME),
            Ok(Caller {
                id: "alice".into(),
                role: Role::Researcher
            })
        );
        // Expired (beyond the leeway), and not yet valid.
        assert!(matches!(
            verify(&t, &st, now + 600 + LEEWAY_SECS + 1, MAX_LIFETIME),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            verify(&t, &st, now - LEEWAY_SECS - 5, MAX_LIFETIME),
            Err(AuthError::Invalid(_))
        ));
        // A key of the same name that is not the registered one.
        let mallory = SignerKey::generate("alice").unwrap();
        let t = mint(&mallory, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verify(&t, &st, now, MAX_LIFETIME),
            Err(AuthError::Invalid(_))
        ));
        // Unknown principal.
        let bob = SignerKey::generate("bob").unwrap();
        let t = mint(&bob, Duration::from_secs(60)).unwrap();
        assert_eq!(
            verify(&t, &st, now, MAX_LIFETIME),
            Err(AuthError::UnknownPrincipal("bob".into()))
        );
        // Wrong audience, sub differing from kid, lifetime over 15 minutes.
        let base = Claims {
            nbf: None,
            sub: "alice".into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + 60,
        };
        let bad = [
            Claims {
                aud: "other".into(),
                ..base.clone()
            },
            Claims {
                sub: "op".into(),
                ..base.clone()
            },
            Claims {
                exp: now + 16 * 60,
                ..base.clone()
            },
            // Extreme numbers: refused, never an overflow.
            Claims {
                exp: i64::MAX,
                ..base.clone()
            },
            Claims {
                iat: i64::MIN,
                ..base.clone()
            },
            Claims {
                iat: i64::MIN,
                exp: i64::MAX,
                ..base.clone()
            },
            Claims {
                iat: i64::MAX,
                exp: i64::MIN,
                ..base.clone()
            },
            Claims {
                iat: i64::MAX,
                exp: i64::MAX,
                ..base.clone()
            },
            // Not valid before far in the future (it was ignored).
            Claims {
                nbf: Some(i64::MAX),
                ..base.clone()
            },
            Claims {
                nbf: Some(now + 3600),
                ..base.clone()
            },
        ];
        for c in &bad {
            assert!(
                matches!(
                    verify(&forge(&alice, "alice", c), &st, now, MAX_LIFETIME),
                    Err(AuthError::Invalid(_))
                ),
                "{c:?}"
            );
        }
        assert!(verify(&forge(&alice, "alice", &base), &st, now, MAX_LIFETIME).is_ok());
        // Garbage and a tampered payload.
        assert!(matches!(
            verify("a.b.c", &st, now, MAX_LIFETIME),
            Err(AuthError::Malformed(_))
        ));
        let t = mint(&alice, Duration::from_secs(60)).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = forge(
            &op,
            "alice",
            &Claims {
                exp: now + 600,
                ..base.clone()
            },
        );
        parts[1] = other.split('.').nth(1).unwrap();
        parts[2] = t.split('.').nth(2).unwrap();
        assert!(verify(&parts.join("."), &st, now, MAX_LIFETIME).is_err());
        assert!(mint(&alice, Duration::from_secs(25 * 3600)).is_err());
    }

    #[test]
    fn bearer_metadata() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(bearer(None), Err(AuthError::Missing));
    }

    #[test]
    fn basic_credentials_carry_a_token_and_its_principal() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            credentials(Some("Bearer abc")),
            Ok(("abc".to_owned(), None))
        );
        assert_eq!(
            credentials(Some(&format!("Basic {}", b64("alice:abc.def")))),
            Ok(("abc.def".to_owned(), Some("alice".to_owned())))
        );
        for bad in ["Basic !!!".to_owned(), format!("Basic {}", b64("no-colon"))] {
            assert!(matches!(
                credentials(Some(&bad)),
                Err(AuthError::Malformed(_))
            ));
        }
        assert_eq!(
            credentials(Some(&format!("Basic {}", b64("alice:")))),
            Err(AuthError::Missing)
        );
        assert_eq!(credentials(None), Err(AuthError::Missing));
    }
}
