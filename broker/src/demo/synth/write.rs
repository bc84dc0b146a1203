//! Writing the drawn records as Arrow batches and Parquet files, one table at a time.

use super::*;

/// A table's columns being built.
pub(super) trait Columns: Default {
    fn schema() -> SchemaRef;
    /// Rows buffered.
    fn rows(&self) -> usize;
    /// The buffered columns (in schema order), emptying the builders.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

pub(super) fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

pub(super) fn date(name: &str) -> Field {
    Field::new(name, DataType::Date32, false)
}

pub(super) fn float(name: &str) -> Field {
    Field::new(name, DataType::Float64, false)
}

#[derive(Default)]
pub(super) struct PatientColumns {
    pub(super) patient_id: StringBuilder,
    pub(super) first_name: StringBuilder,
    pub(super) last_name: StringBuilder,
    pub(super) ssn: StringBuilder,
    pub(super) address: StringBuilder,
    pub(super) city: StringBuilder,
    pub(super) state: StringBuilder,
    pub(super) zip: StringBuilder,
    pub(super) birth_date: Date32Builder,
    pub(super) sex: StringBuilder,
    pub(super) race: StringBuilder,
    pub(super) ethnicity: StringBuilder,
}

impl PatientColumns {
    pub(super) fn push(&mut self, p: &Person) {
        self.patient_id.append_value(&p.id);
        self.first_name.append_value(p.first_name);
        self.last_name.append_value(p.last_name);
        self.ssn.append_value(&p.ssn);
        self.address.append_value(&p.address);
        self.city.append_value(p.place.city);
        self.state.append_value(STATE);
        self.zip.append_value(p.place.zip);
        self.birth_date.append_value(p.birth);
        self.sex.append_value(if p.female { "F" } else { "M" });
        self.race.append_value(p.race);
        self.ethnicity.append_value(if p.hispanic {
            "hispanic"
        } else {
            "nonhispanic"
        });
    }
}

impl Columns for PatientColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            utf8("first_name"),
            utf8("last_name"),
            utf8("ssn"),
            utf8("address"),
            utf8("city"),
            utf8("state"),
            utf8("zip"),
            date("birth_date"),
            utf8("sex"),
            utf8("race"),
            utf8("ethnicity"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.first_name.finish()),
            Arc::new(self.last_name.finish()),
            Arc::new(self.ssn.finish()),
            Arc::new(self.address.finish()),
            Arc::new(self.city.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.zip.finish()),
            Arc::new(self.birth_date.finish()),
            Arc::new(self.sex.finish()),
            Arc::new(self.race.finish()),
            Arc::new(self.ethnicity.finish()),
        ]
    }
}

#[derive(Default)]
pub(super) struct EncounterColumns {
    pub(super) encounter_id: StringBuilder,
    pub(super) patient_id: StringBuilder,
    pub(super) start_date: Date32Builder,
    pub(super) encounter_class: StringBuilder,
    pub(super) reason_code: StringBuilder,
    pub(super) cost: Float64Builder,
}

impl EncounterColumns {
    pub(super) fn push(&mut self, patient_id: &str, v: &Visit) {
        self.encounter_id.append_value(&v.id);
        self.patient_id.append_value(patient_id);
        self.start_date.append_value(v.start);
        self.encounter_class.append_value(CLASSES[v.class].0);
        self.reason_code.append_option(v.reason.map(Cond::code));
        self.cost.append_value(v.cost);
    }
}

impl Columns for EncounterColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("encounter_id"),
            utf8("patient_id"),
            date("start_date"),
            utf8("encounter_class"),
            Field::new("reason_code", DataType::Utf8, true),
            float("cost"),
        ]))
    }

    fn rows(&self) -> usize {
        self.encounter_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.encounter_id.finish()),
            Arc::new(self.patient_id.finish()),
            Arc::new(self.start_date.finish()),
            Arc::new(self.encounter_class.finish()),
            Arc::new(self.reason_code.finish()),
            Arc::new(self.cost.finish()),
        ]
    }
}

#[derive(Default)]
pub(super) struct ConditionColumns {
    pub(super) patient_id: StringBuilder,
    pub(super) onset_date: Date32Builder,
    pub(super) code: StringBuilder,
    pub(super) description: StringBuilder,
}

impl ConditionColumns {
    pub(super) fn push(&mut self, patient_id: &str, d: &Diagnosis) {
        self.patient_id.append_value(patient_id);
        self.onset_date.append_value(d.onset);
        self.code.append_value(d.cond.code());
        self.description.append_value(d.cond.description());
    }
}

impl Columns for ConditionColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            date("onset_date"),
            utf8("code"),
            utf8("description"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.onset_date.finish()),
            Arc::new(self.code.finish()),
            Arc::new(self.description.finish()),
        ]
    }
}

#[derive(Default)]
pub(super) struct ObservationColumns {
    pub(super) patient_id: StringBuilder,
    pub(super) date: Date32Builder,
    pub(super) code: StringBuilder,
    pub(super) description: StringBuilder,
    pub(super) value: Float64Builder,
    pub(super) units: StringBuilder,
}

impl ObservationColumns {
    pub(super) fn push(&mut self, patient_id: &str, m: &Measurement) {
        self.patient_id.append_value(patient_id);
        self.date.append_value(m.day);
        self.code.append_value(m.lab.code());
        self.description.append_value(m.lab.description());
        self.value.append_value(m.value);
        self.units.append_value(m.lab.units());
    }
}

impl Columns for ObservationColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            date("date"),
            utf8("code"),
            utf8("description"),
            float("value"),
            utf8("units"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.date.finish()),
            Arc::new(self.code.finish()),
            Arc::new(self.description.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.units.finish()),
        ]
    }
}

/// One table's Parquet file and its buffered rows.
pub(super) struct Sink<C> {
    pub(super) name: &'static str,
    pub(super) path: PathBuf,
    pub(super) schema: SchemaRef,
    pub(super) writer: ArrowWriter<File>,
    pub(super) columns: C,
    pub(super) rows: u64,
}

impl<C: Columns> Sink<C> {
    pub(super) fn create(dir: &Path, name: &'static str) -> Result<Self> {
        let path = dir.join(format!("{name}.parquet"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let schema = C::schema();
        let writer = ArrowWriter::try_new(file, schema.clone(), None)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Sink {
            name,
            path,
            schema,
            writer,
            columns: C::default(),
            rows: 0,
        })
    }

    /// Writes the buffered rows once a batch's worth has built up (any left, if `all`).
    pub(super) fn flush(&mut self, all: bool) -> Result<()> {
        let n = self.columns.rows();
        if n == 0 || (!all && n < BATCH_ROWS) {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), self.columns.finish())
            .with_context(|| format!("building a batch of table {}", self.name))?;
        self.writer
            .write(&batch)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += n as u64;
        Ok(())
    }

    pub(super) fn close(mut self) -> Result<Table> {
        self.flush(true)?;
        self.writer
            .close()
            .with_context(|| format!("closing {}", self.path.display()))?;
        Ok(Table {
            name: self.name,
            path: self.path,
            rows: self.rows,
        })
    }
}

/// The four tables being written.
pub(super) struct Sinks {
    pub(super) patients: Sink<PatientColumns>,
    pub(super) encounters: Sink<EncounterColumns>,
    pub(super) conditions: Sink<ConditionColumns>,
    pub(super) observations: Sink<ObservationColumns>,
}

impl Sinks {
    pub(super) fn create(dir: &Path) -> Result<Sinks> {
        Ok(Sinks {
            patients: Sink::create(dir, "patients")?,
            encounters: Sink::create(dir, "encounters")?,
            conditions: Sink::create(dir, "conditions")?,
            observations: Sink::create(dir, "observations")?,
        })
    }

    /// Buffers one patient's rows, writing full batches.
    pub(super) fn push(
        &mut self,
        p: &Person,
        conditions: &[Diagnosis],
        visits: &[Visit],
        labs: &[Measurement],
    ) -> Result<()> {
        self.patients.columns.push(p);
        for v in visits {
            self.encounters.columns.push(&p.id, v);
        }
        for d in conditions {
            self.conditions.columns.push(&p.id, d);
        }
        for m in labs {
            self.observations.columns.push(&p.id, m);
        }
        self.patients.flush(false)?;
        self.encounters.flush(false)?;
        self.conditions.flush(false)?;
        self.observations.flush(false)
    }

    pub(super) fn close(self) -> Result<Vec<Table>> {
        Ok(vec![
            self.patients.close()?,
            self.encounters.close()?,
            self.conditions.close()?,
            self.observations.close()?,
        ])
    }
}
