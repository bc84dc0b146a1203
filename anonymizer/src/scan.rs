//! Rows first: the only way a query reaches a dataset's rows.
//!
//! A query is planned against a catalog of schema-only tables ([`catalog_table`]), which hold
//! no data: whatever a plan reads there is empty. To run the part of a checked plan below its
//! aggregate, each table scan is pointed at a [`GuardedTable`], whose scan yields only the
//! rows the query may see: the consented units' rows, each unit's rows already bounded at
//! load. The consent bitmap is applied inside the scan's own execution node
//! ([`GuardedExec`]), a leaf that accepts no pushed-down filter, so no optimizer rule can
//! evaluate a researcher's expression on a row before the consent filter has removed it.
//! The scan reports no statistics, so no row count of the unfiltered table is ever used to
//! answer a query.

use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Schema, SchemaRef, UInt32Type};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};

use crate::consent::UnitSet;
use crate::dataset::{Table, UNIT_COLUMN};

/// The schema-only table a query is planned against: the table's columns without the
/// internal unit column, and no rows.
pub fn catalog_table(table: &Table) -> Arc<dyn TableProvider> {
    let fields: Vec<_> = table
        .schema
        .fields()
        .iter()
        .filter(|f| f.name() != UNIT_COLUMN)
        .cloned()
        .collect();
    Arc::new(EmptyTable::new(Arc::new(Schema::new(fields))))
}

/// A table as one query may see it: its bounded rows, of consented units only.
#[derive(Debug)]
pub struct GuardedTable {
    table: Arc<Table>,
    consented: Option<Arc<UnitSet>>,
    partitions: usize,
}

impl GuardedTable {
    /// `table` seen through `consented` (`None`: every unit).
    pub fn new(table: Arc<Table>, consented: Option<Arc<UnitSet>>) -> GuardedTable {
        let partitions = std::thread::available_parallelism().map_or(1, |n| n.get());
        GuardedTable {
            table,
            consented,
            partitions,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for GuardedTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Researcher predicates stay above the scan, evaluated on its output only.
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = &self.table.schema;
        let unit = schema.index_of(UNIT_COLUMN)?;
        let output: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        let n = self.partitions.max(1);
        let mut parts = vec![Vec::new(); n];
        for (i, b) in self.table.batches.iter().enumerate() {
            parts[i % n].push(b.clone());
        }
        Ok(Arc::new(GuardedExec::new(
            Arc::new(schema.project(&output)?),
            parts,
            self.consented.clone(),
            unit,
            output,
        )))
    }
}

/// The scan of a [`GuardedTable`]: each batch's consented rows, projected.
#[derive(Debug)]
pub struct GuardedExec {
    partitions: Vec<Vec<RecordBatch>>,
    consented: Option<Arc<UnitSet>>,
    unit: usize,
    output: Vec<usize>,
    properties: Arc<PlanProperties>,
}

impl GuardedExec {
    fn new(
        schema: SchemaRef,
        partitions: Vec<Vec<RecordBatch>>,
        consented: Option<Arc<UnitSet>>,
        unit: usize,
        output: Vec<usize>,
    ) -> GuardedExec {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        GuardedExec {
            partitions,
            consented,
            unit,
            output,
            properties: Arc::new(properties),
        }
    }
}

/// The consented rows of `batch`, projected to `output`.
fn guard(
    batch: &RecordBatch,
    consented: Option<&UnitSet>,
    unit: usize,
    output: &[usize],
) -> DfResult<RecordBatch> {
    let batch = match consented {
        None => batch.clone(),
        Some(set) => {
            let codes = batch.column(unit).as_primitive::<UInt32Type>().values();
            let bits =
                arrow::buffer::BooleanBuffer::collect_bool(codes.len(), |i| set.contains(codes[i]));
            let mask = BooleanArray::new(bits, None);
            if mask.true_count() == batch.num_rows() {
                batch.clone()
            } else {
                // Project first: only the columns the query reads are copied.
                let keep = batch.project(output)?;
                return Ok(arrow::compute::filter_record_batch(&keep, &mask)?);
            }
        }
    };
    Ok(batch.project(output)?)
}

impl DisplayAs for GuardedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "GuardedExec: consented={}",
            if self.consented.is_some() {
                "bitmap"
            } else {
                "all"
            }
        )
    }
}

impl ExecutionPlan for GuardedExec {
    fn name(&self) -> &'static str {
        "GuardedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let batches = self.partitions.get(partition).cloned().unwrap_or_default();
        let consented = self.consented.clone();
        let (unit, output) = (self.unit, self.output.clone());
        let stream = futures::stream::iter(batches.into_iter().map(move |b| {
            guard(&b, consented.as_deref(), unit, &output)
                .map_err(|e| e.context("reading the consented rows"))
        }));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.properties.eq_properties.schema().clone(),
            stream,
        )))
    }
}
