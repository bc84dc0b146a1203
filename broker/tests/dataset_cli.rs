//! `broker dataset inspect`, end to end: a planted table in, a proposed policy and findings out.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

fn broker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `batch` as an Arrow IPC file.
fn write_ipc(path: &std::path::Path, batch: &RecordBatch) {
    let mut w = arrow::ipc::writer::FileWriter::try_new(
        std::fs::File::create(path).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(batch).unwrap();
    w.finish().unwrap();
}

fn write_table(path: &std::path::Path) {
    let n = 300;
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("contact", DataType::Utf8, false),
        Field::new("zip", DataType::Utf8, false),
        Field::new("diagnosis", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("person{i}@example.org")),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("{:05}", 2100 + i)),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| ["E11", "I10"][i as usize % 2].to_string()),
            )),
        ],
    )
    .unwrap();
    write_ipc(path, &batch);
}

#[test]
fn inspect_proposes_a_policy_and_explains_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("visits.arrow");
    write_table(&file);
    let out = broker(&["dataset", "inspect", file.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("privacy_unit = \"patient_id\""), "{stdout}");
    assert!(
        stdout.contains("contact = { class = \"direct_identifier\" }"),
        "{stdout}"
    );
    assert!(
        stdout.contains("zip = { class = \"quasi_identifier\", generalize = \"zip3\" }"),
        "{stdout}"
    );
    assert!(
        stderr.contains("100% of 300 sampled values match the email"),
        "{stderr}"
    );
    // Findings never show values.
    assert!(!stdout.contains("example.org") && !stderr.contains("example.org"));

    // --out writes the file (never over an existing one); --json gives the findings.
    let policy = dir.path().join("policy.toml");
    let out = broker(&[
        "dataset",
        "inspect",
        file.to_str().unwrap(),
        "--out",
        policy.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["findings"][1]["kind"], "email");
    assert_eq!(v["findings"][1]["class"], "direct_identifier");
    assert!(
        std::fs::read_to_string(&policy)
            .unwrap()
            .contains("[tables.visits.columns]")
    );
    let again = broker(&[
        "dataset",
        "inspect",
        file.to_str().unwrap(),
        "--out",
        policy.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("cannot create"));
}

#[test]
fn inspect_refuses_unreadable_files_and_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.parquet");
    std::fs::write(&bad, b"not parquet").unwrap();
    let out = broker(&["dataset", "inspect", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("notes.parquet"),
        "{}",
        text(&out.stderr)
    );
    let help = broker(&["dataset", "inspect", "--help"]);
    let help = text(&help.stdout);
    assert!(
        help.contains("CONSENTRY_INSPECT_OUT") && help.contains("--sample"),
        "{help}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `broker dataset inspect --json | head` once panicked on the closed pipe.
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("visits.arrow");
    write_table(&table);
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["dataset", "inspect", "--json", table.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before anything is read.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
}

fn write_labs(path: &std::path::Path, unit: &str) {
    let n = 600;
    let schema = Arc::new(Schema::new(vec![
        Field::new(unit, DataType::Int64, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i / 2))),
            Arc::new(arrow::array::Float64Array::from_iter_values(
                (0..n).map(|i| 4.0 + (i % 100) as f64 / 10.0),
            )),
        ],
    )
    .unwrap();
    write_ipc(path, &batch);
}

#[test]
fn inspect_proposes_one_policy_for_every_table_of_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let visits = dir.path().join("v.arrow");
    write_table(&visits);
    let (labs1, labs2) = (dir.path().join("l1.arrow"), dir.path().join("l2.arrow"));
    write_labs(&labs1, "patient_id");
    write_labs(&labs2, "patient_id");
    let arg = |name: &str, p: &std::path::Path| format!("{name}={}", p.display());
    let out = broker(&[
        "dataset",
        "inspect",
        &arg("visits", &visits),
        &arg("labs", &labs1),
        &arg("labs", &labs2),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.matches("privacy_unit = ").count(), 1, "{stdout}");
    let policy = anonymizer::policy::Policy::from_toml(&stdout).unwrap();
    // Both tables, every column classified; the two files of labs are one table (2 rows per
    // patient in each file, so 4 in the table).
    for (table, path) in [("visits", &visits), ("labs", &labs1)] {
        let reader =
            arrow::ipc::reader::FileReader::try_new(std::fs::File::open(path).unwrap(), None)
                .unwrap();
        policy.check_schema(table, &reader.schema()).unwrap();
    }
    assert_eq!(policy.table_bounds("labs").rows, 4, "{stdout}");
    assert!(
        stderr.contains("table visits") && stderr.contains("table labs"),
        "{stderr}"
    );
    // Tables that name the patient differently cannot share a policy: said, nothing written.
    let other = dir.path().join("o.arrow");
    write_labs(&other, "person_id");
    let out = broker(&[
        "dataset",
        "inspect",
        &arg("visits", &visits),
        &arg("measurement", &other),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("disagree on the privacy unit"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn inspect_reads_a_directory_of_csv_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut visits = String::from("patient_id,zip,age,visit_date\n");
    let mut labs = [
        String::from("patient_id,code,value\n"),
        String::from("patient_id,code,value\n"),
    ];
    for i in 0..300 {
        visits.push_str(&format!(
            "p{i},0{:04},{},2021-0{}-1{}\n",
            1000 + i,
            20 + i % 60,
            1 + i % 9,
            i % 10
        ));
        labs[i % 2].push_str(&format!("p{i},4548-4,{}.{}\n", 4 + i % 9, i % 10));
    }
    std::fs::write(d.join("visits.csv"), visits).unwrap();
    std::fs::create_dir(d.join("labs")).unwrap();
    for (k, l) in labs.iter().enumerate() {
        std::fs::write(d.join("labs").join(format!("part-{k}.csv")), l).unwrap();
    }
    // Not tables: passed over.
    std::fs::write(d.join("_SUCCESS"), "").unwrap();
    std::fs::write(d.join("notes.txt"), "exported").unwrap();
    let out = broker(&["dataset", "inspect", d.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let policy = anonymizer::policy::Policy::from_toml(&stdout).unwrap();
    // Both tables, the two files of labs one table, every column classified against the
    // types read from the CSV files (the ZIP code stays text: its leading zero).
    for (table, file) in [
        ("visits", d.join("visits.csv")),
        ("labs", d.join("labs/part-0.csv")),
    ] {
        let (schema, _) = anonymizer::files::read_batches(&file).unwrap();
        policy.check_schema(table, &schema).unwrap();
    }
    assert!(
        stdout.contains("zip = { class = \"quasi_identifier\", generalize = \"zip3\" }"),
        "{stdout}"
    );
    assert!(
        stderr.contains("table visits") && stderr.contains("table labs"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("notes") && !stdout.contains("SUCCESS"),
        "{stdout}"
    );
    // A directory without a table file is refused, naming what it looked for.
    let empty = tempfile::tempdir().unwrap();
    let out = broker(&["dataset", "inspect", empty.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("holds no table file"),
        "{}",
        text(&out.stderr)
    );
}
