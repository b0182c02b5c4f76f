//! The library's choice enums as clap values: their names and help on the command line live
//! here, so the library itself does not know clap.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use crate::job::batch::Format;
use crate::keys::keygen::Engine;
use crate::telemetry::progress::ProgressMode;
use crate::upstream::http::AliyunSigning;

/// `impl ValueEnum` for a fieldless enum: each variant with its name and, optionally, help.
macro_rules! value_enum {
    ($ty:ty { $($variant:path => $name:literal $(, $help:literal)?;)* }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($variant),*]
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(match self {
                    $($variant => PossibleValue::new($name)$(.help($help))?,)*
                })
            }
        }
    };
}

value_enum!(AliyunSigning {
    AliyunSigning::V3 => "v3", "ACS3-HMAC-SHA256 (the Tea SDKs' default)";
    AliyunSigning::Rpc => "rpc", "RPC HMAC-SHA1, signature version 1.0 (the classic SDK)";
});

value_enum!(ProgressMode {
    ProgressMode::Auto => "auto", "A bar when stderr is a terminal, lines otherwise";
    ProgressMode::Bar => "bar";
    ProgressMode::Lines => "lines";
    ProgressMode::Off => "off";
});

value_enum!(Format {
    Format::Csv => "csv";
    Format::Jsonl => "jsonl";
});

value_enum!(Engine {
    Engine::Fast => "fast", "keyfleet's own engine (constant-time sieve, Miller-Rabin and \
        fixed-size Montgomery arithmetic): the default";
    Engine::CryptoPrimes => "crypto-primes", "crypto-primes 0.7 (sieve + BPSW) feeding the \
        constant-time key assembly";
    Engine::RsaCrate => "rsa-crate", "rsa 0.9's RsaPrivateKey::new: the reference baseline";
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name parses back to its variant (what the derive guaranteed).
    #[test]
    fn names_round_trip() {
        fn check<T: ValueEnum + PartialEq + std::fmt::Debug>() {
            for v in T::value_variants() {
                let name = v.to_possible_value().unwrap().get_name().to_owned();
                assert_eq!(T::from_str(&name, false).as_ref(), Ok(v), "{name}");
            }
        }
        check::<AliyunSigning>();
        check::<ProgressMode>();
        check::<Format>();
        check::<Engine>();
    }
}
