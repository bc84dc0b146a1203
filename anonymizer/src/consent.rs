//! The consent filter, applied as a semi-join on the privacy unit before any aggregation.
//!
//! The broker hands over the ids that may be included (opt-in) or the ids that must be
//! excluded (opt-out). They are turned once into a bitmap over the dataset's dense unit
//! numbers, and rows are kept by a bitmap lookup in a scalar function over
//! [`crate::dataset::UNIT_COLUMN`]: linear in rows, constant per row, no join.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray};
use arrow::datatypes::{DataType, UInt32Type};
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::dataset::UnitIndex;

/// Who may be included in a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentFilter {
    /// Only these privacy-unit ids (opt-in).
    Include(Arc<Vec<String>>),
    /// Everyone except these ids (opt-out).
    Exclude(Arc<Vec<String>>),
}

impl ConsentFilter {
    /// Everyone (an opt-out dataset nobody objected to).
    pub fn everyone() -> ConsentFilter {
        ConsentFilter::Exclude(Arc::new(Vec::new()))
    }
}

/// A set of dense unit numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnitSet {
    bits: Vec<u64>,
    /// A digest of the filter it came from, for equality of the scalar function.
    tag: [u8; 32],
}

impl UnitSet {
    /// The set a filter admits among `units`, or `None` when it admits everyone.
    pub fn from_filter(filter: &ConsentFilter, units: &UnitIndex) -> Option<UnitSet> {
        let n = units.len();
        let words = n.div_ceil(64);
        let (ids, include) = match filter {
            ConsentFilter::Include(ids) => (ids, true),
            ConsentFilter::Exclude(ids) if ids.is_empty() => return None,
            ConsentFilter::Exclude(ids) => (ids, false),
        };
        let mut bits = if include {
            vec![0u64; words]
        } else {
            vec![u64::MAX; words]
        };
        for id in ids.iter() {
            if let Some(c) = units.lookup(id) {
                let (w, b) = (c as usize / 64, c as usize % 64);
                if include {
                    bits[w] |= 1 << b;
                } else {
                    bits[w] &= !(1 << b);
                }
            }
        }
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update([u8::from(include)]);
        for id in ids.iter() {
            h.update(id.as_bytes());
            h.update([0]);
        }
        Some(UnitSet {
            bits,
            tag: h.finalize().into(),
        })
    }

    /// Whether unit `c` is in the set (units beyond the index are not).
    pub fn contains(&self, c: u32) -> bool {
        self.bits
            .get(c as usize / 64)
            .is_some_and(|w| w >> (c % 64) & 1 == 1)
    }

    /// The filter as a DataFusion scalar function `consented(unit) -> bool`.
    pub fn udf(self) -> ScalarUDF {
        Self::shared_udf(&Arc::new(self))
    }

    /// [`UnitSet::udf`] of a set shared between queries.
    pub fn shared_udf(set: &Arc<UnitSet>) -> ScalarUDF {
        ScalarUDF::new_from_impl(Consented {
            set: set.clone(),
            signature: Signature::exact(vec![DataType::UInt32], Volatility::Immutable),
        })
    }
}

/// The scalar function keeping consented rows.
#[derive(Debug)]
struct Consented {
    set: Arc<UnitSet>,
    signature: Signature,
}

impl PartialEq for Consented {
    fn eq(&self, other: &Self) -> bool {
        self.set.tag == other.set.tag
    }
}
impl Eq for Consented {}
impl Hash for Consented {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.set.tag.hash(state);
    }
}

/// Name of the consent scalar function.
pub const CONSENTED: &str = "__consentry_consented";

impl ScalarUDFImpl for Consented {
    fn name(&self) -> &str {
        CONSENTED
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return exec_err!("{CONSENTED} takes one argument");
        };
        let arr = arg.to_array(args.number_rows)?;
        let codes = arr.as_primitive::<UInt32Type>().values();
        // Unit numbers are never null: one bit per row, no validity bitmap.
        let bits = arrow::buffer::BooleanBuffer::collect_bool(codes.len(), |i| {
            self.set.contains(codes[i])
        });
        let out = BooleanArray::new(bits, None);
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
