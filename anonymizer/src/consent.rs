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

/// Who may be included in a query: the ledger's consent snapshot itself (its digest made
/// once, by the ledger's one formula; its ids never copied).
pub use ledger::state::ConsentFilter;
use ledger::state::{Basis, Changes};

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
        let include = filter.basis() == Basis::Include;
        if !include && filter.ids().is_empty() {
            return None;
        }
        let words = units.len().div_ceil(64);
        let mut set = UnitSet {
            bits: vec![if include { 0 } else { u64::MAX }; words],
            tag: *filter.digest().bytes(),
        };
        for id in filter.ids() {
            set.mark(units, id.as_str(), include);
        }
        Some(set)
    }

    /// The set of `filter` made from the set of the snapshot its changes apply to
    /// (`parent`: `None` when that one admitted everyone): only the changed ids are looked
    /// up. `None` when `filter` carries no changes.
    pub fn updated(
        parent: Option<&UnitSet>,
        filter: &ConsentFilter,
        units: &UnitIndex,
    ) -> Option<Option<UnitSet>> {
        let Changes { added, removed, .. } = filter.changes()?;
        let include = filter.basis() == Basis::Include;
        if !include && filter.ids().is_empty() {
            return Some(None);
        }
        let words = units.len().div_ceil(64);
        let mut set = UnitSet {
            bits: match parent {
                Some(p) => p.bits.clone(),
                // The parent admitted everyone: an opt-out list that was empty.
                None if !include => vec![u64::MAX; words],
                None => return None,
            },
            tag: *filter.digest().bytes(),
        };
        // Listed ids are in for an opt-in list and out for an opt-out one.
        for id in added {
            set.mark(units, id.as_str(), include);
        }
        for id in removed {
            set.mark(units, id.as_str(), !include);
        }
        Some(Some(set))
    }

    /// Puts the unit of `id` (if the dataset has it) in or out of the set.
    fn mark(&mut self, units: &UnitIndex, id: &str, admitted: bool) {
        if let Some(c) = units.lookup(id) {
            let (w, b) = (c as usize / 64, c as usize % 64);
            if admitted {
                self.bits[w] |= 1 << b;
            } else {
                self.bits[w] &= !(1 << b);
            }
        }
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
