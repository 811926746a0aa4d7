//! Lambda's on-demand prices for x86 functions, per Region: what `cost` multiplies by unless
//! `--price-per-million` and `--price-per-gb-second` say otherwise.
//!
//! The figures are AWS's published first-tier prices (up to 6 billion GB-seconds a month per
//! Region, far beyond a gateway's share) in USD, without the free tier. Regions not listed are
//! priced as US East (N. Virginia), and the report says so.

/// USD per million requests in most Regions.
pub const STANDARD_PER_MILLION: f64 = 0.20;
/// USD per GB-second of x86 duration in most Regions.
pub const STANDARD_PER_GB_SECOND: f64 = 0.000_016_666_7;
/// The Region whose prices stand in for one not listed.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Regions at the standard prices.
const STANDARD_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "ap-south-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
];

/// Regions priced higher: (Region, USD per million requests, USD per GB-second).
const OTHER_REGIONS: &[(&str, f64, f64)] = &[
    ("af-south-1", 0.27, 0.000_022_1),
    ("ap-east-1", 0.28, 0.000_028_65),
    ("eu-south-1", 0.23, 0.000_019_517_2),
    ("me-south-1", 0.25, 0.000_020_666_7),
];

/// The prices a report uses and where they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Prices {
    /// USD per million requests.
    pub per_million: f64,
    /// USD per GB-second.
    pub per_gb_second: f64,
    /// Where they come from, for the report ("the eu-west-1 price", "--price-per-million").
    pub source: String,
}

impl Prices {
    /// The prices for `region` (None: not configured), each overridden when given.
    pub fn for_region(
        region: Option<&str>,
        per_million: Option<f64>,
        per_gb_second: Option<f64>,
    ) -> Prices {
        let (table_million, table_gb, from_table) = match region {
            Some(r) if STANDARD_REGIONS.contains(&r) => (
                STANDARD_PER_MILLION,
                STANDARD_PER_GB_SECOND,
                format!("Lambda's {r} price"),
            ),
            Some(r) => match OTHER_REGIONS.iter().find(|(name, ..)| *name == r) {
                Some((_, million, gb)) => (*million, *gb, format!("Lambda's {r} price")),
                None => (
                    STANDARD_PER_MILLION,
                    STANDARD_PER_GB_SECOND,
                    format!(
                        "Lambda's {DEFAULT_REGION} price ({r} is not in the table; give \
                         --price-per-million and --price-per-gb-second)"
                    ),
                ),
            },
            None => (
                STANDARD_PER_MILLION,
                STANDARD_PER_GB_SECOND,
                format!("Lambda's {DEFAULT_REGION} price (no aws.region or AWS_REGION set)"),
            ),
        };
        let source = match (per_million, per_gb_second) {
            (Some(_), Some(_)) => "--price-per-million and --price-per-gb-second".to_owned(),
            (Some(_), None) => format!("--price-per-million; GB-seconds at {from_table}"),
            (None, Some(_)) => format!("--price-per-gb-second; requests at {from_table}"),
            (None, None) => from_table,
        };
        Prices {
            per_million: per_million.unwrap_or(table_million),
            per_gb_second: per_gb_second.unwrap_or(table_gb),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_have_their_price_and_others_the_us_east_price_said_so() {
        let ireland = Prices::for_region(Some("eu-west-1"), None, None);
        assert_eq!(
            (ireland.per_million, ireland.per_gb_second),
            (0.20, 0.000_016_666_7)
        );
        assert_eq!(ireland.source, "Lambda's eu-west-1 price");
        let cape_town = Prices::for_region(Some("af-south-1"), None, None);
        assert_eq!(cape_town.per_gb_second, 0.000_022_1);
        let unknown = Prices::for_region(Some("xx-nowhere-1"), None, None);
        assert_eq!(unknown.per_million, 0.20);
        assert!(unknown.source.contains("xx-nowhere-1 is not in the table"));
        let none = Prices::for_region(None, None, None);
        assert!(none.source.contains("no aws.region"), "{}", none.source);
    }

    #[test]
    fn flags_override_each_price_and_say_so() {
        let p = Prices::for_region(Some("eu-west-1"), Some(0.5), None);
        assert_eq!((p.per_million, p.per_gb_second), (0.5, 0.000_016_666_7));
        assert!(p.source.starts_with("--price-per-million; GB-seconds at"));
        let p = Prices::for_region(None, Some(1.0), Some(2.0));
        assert_eq!((p.per_million, p.per_gb_second), (1.0, 2.0));
    }
}
