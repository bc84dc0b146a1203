#!/usr/bin/env bash
# A walk through the ledger from the command line: every principal role and every entry kind,
# proofs, a sponsor's offline bundle check, and tamper detection. Runs on an embedded ledger
# under $CONSENTRY_DATA_DIR (default ./consentry-data); no server is needed.
#
#   bash broker/scripts/ledger-walkthrough.sh            # builds broker in release mode
#   BROKER=/path/to/broker bash broker/scripts/...       # uses that binary
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${BROKER:-}" ]; then
  echo "== building broker (release)" >&2
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin broker
  BROKER="$root/target/release/broker"
fi
broker() { "$BROKER" "$@"; }

export CONSENTRY_DATA_DIR=${CONSENTRY_DATA_DIR:-$PWD/consentry-data}
if [ -e "$CONSENTRY_DATA_DIR/ledger" ]; then
  echo "$CONSENTRY_DATA_DIR/ledger exists; remove it or set CONSENTRY_DATA_DIR" >&2
  exit 1
fi
work="$CONSENTRY_DATA_DIR/walkthrough"
mkdir -p "$work"
cd "$work"
step() { printf '\n== %s\n' "$*" >&2; }
entry() { cat > "$1"; }

step "create the ledger; its key signs checkpoints and the operator's entries"
broker ledger init --origin example.org/consentry
OPERATOR_KEY="$CONSENTRY_DATA_DIR/ledger/ledger.key"

step "each principal makes its own key (private key file mode 0600)"
ST_MARY=$(broker ledger keygen --name st-mary --out st-mary.key)
IRB=$(broker ledger keygen --name irb-boston --out irb-boston.key)
DR_LEE=$(broker ledger keygen --name dr-lee --out dr-lee.key)
ACME=$(broker ledger keygen --name acme-pharma --out acme-pharma.key)
ALICE=$(broker ledger keygen --name alice --out alice.key)
WITNESS=$(broker ledger keygen --name witness-1 --out witness-1.key)

step "the operator registers them (principal_registered)"
for p in "st-mary custodian $ST_MARY" "irb-boston irb $IRB" "dr-lee researcher $DR_LEE" \
         "acme-pharma sponsor $ACME" "witness-1 witness $WITNESS"; do
  set -- $p
  entry reg.json <<JSON
{"kind": "principal_registered",
 "body": {"id": "$1", "role": "$2", "key": "$3"}}
JSON
  broker ledger append --key "$OPERATOR_KEY" --entry reg.json
done
entry alice.json <<JSON
{"kind": "principal_registered",
 "body": {"id": "alice", "role": "patient", "key": "$ALICE", "subject": "MRN-0001"}}
JSON
broker ledger append --key "$OPERATOR_KEY" --entry alice.json

step "the custodian registers a dataset version (dataset_registered; digest filled in by the CLI)"
entry dataset.json <<'JSON'
{"kind": "dataset_registered",
 "body": {"dataset": "ehr-2026", "version": 1, "custodian": "st-mary",
          "consent_basis": "opt_in", "privacy_unit": "patient_id",
          "policy_digest": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
          "tables": [{"name": "visits", "rows": 3,
                      "columns": [{"name": "patient_id", "data_type": "Utf8", "nullable": false},
                                  {"name": "age", "data_type": "Int64", "nullable": true}],
                      "files": [{"path": "visits.parquet", "bytes": 2048, "rows": 3,
                                 "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}]}]}}
JSON
broker ledger append --key st-mary.key --entry dataset.json

step "consents: a paper consent recorded by the custodian, and one the patient gives herself"
entry consent-paper.json <<'JSON'
{"kind": "consent_granted",
 "body": {"consent_id": "paper-0042", "subject": "MRN-0002",
          "scope": {"custodian": "st-mary"},
          "purposes": ["HMB"], "modifiers": ["IRB"],
          "valid_from": "2026-01-01T00:00:00Z", "grantor": "st-mary"}}
JSON
broker ledger append --key st-mary.key --entry consent-paper.json
entry consent-alice.json <<'JSON'
{"kind": "consent_granted",
 "body": {"consent_id": "alice-1", "subject": "MRN-0001",
          "scope": {"datasets": ["ehr-2026"]},
          "purposes": ["DS:MONDO:0005148"], "modifiers": ["NCU"],
          "studies_deny": ["marketing-1"],
          "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2030-01-01T00:00:00Z",
          "grantor": "alice", "fhir_id": "consent-alice-1"}}
JSON
broker ledger append --key alice.key --entry consent-alice.json

step "the principal investigator registers a study (study_registered)"
entry study.json <<'JSON'
{"kind": "study_registered",
 "body": {"study": "t2d-outcomes", "title": "Type 2 diabetes outcomes after GLP-1",
          "sponsor": "acme-pharma", "pi": "dr-lee", "researchers": ["dr-lee"],
          "purpose": "DS:MONDO:0005148", "commercial": false,
          "datasets": ["ehr-2026"]}}
JSON
broker ledger append --key dr-lee.key --entry study.json

step "the IRB approves it with a privacy budget (study_approved)"
entry approval.json <<'JSON'
{"kind": "study_approved",
 "body": {"study": "t2d-outcomes",
          "grants": [{"dataset": "ehr-2026", "epsilon": 3.0, "delta": 1e-6,
                      "dp": true, "extract_k": 10, "min_cell_size": 11}],
          "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2028-01-01T00:00:00Z"}}
JSON
broker ledger append --key irb-boston.key --entry approval.json

step "a released query and a denied one are receipted by the broker (query_receipt)"
DIGEST=$(broker ledger entry --index 7 | sed -n 's/.*"digest": "\([0-9a-f]*\)".*/\1/p' | head -1)
entry receipt.json <<JSON
{"kind": "query_receipt",
 "body": {"study": "t2d-outcomes", "researcher": "dr-lee",
          "dataset": "ehr-2026", "version": 1, "dataset_digest": "$DIGEST",
          "sql": "SELECT age_band, COUNT(*) FROM visits GROUP BY age_band",
          "mode": "dp", "mechanism": {"noise": "discrete_laplace", "scale": 2.0},
          "epsilon": 0.5, "delta": 0,
          "consent_digest": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
          "result_digest": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
          "outcome": "released"}}
JSON
broker ledger append --key "$OPERATOR_KEY" --entry receipt.json
entry denied.json <<'JSON'
{"kind": "query_receipt",
 "body": {"study": "t2d-outcomes", "researcher": "dr-lee",
          "sql": "SELECT * FROM visits", "mode": "dp", "epsilon": 0, "delta": 0,
          "outcome": "denied",
          "reason": "SELECT * would release rows; use aggregates"}}
JSON
broker ledger append --key "$OPERATOR_KEY" --entry denied.json
SPONSOR_CHECKPOINT=$PWD/sponsor-kept.checkpoint
broker ledger checkpoint > "$SPONSOR_CHECKPOINT"
OLD_SIZE=$(sed -n 2p "$SPONSOR_CHECKPOINT")

step "the patient revokes her consent (consent_revoked); a witness cosigns a checkpoint"
entry revoke.json <<'JSON'
{"kind": "consent_revoked",
 "body": {"subject": "MRN-0001", "consent_id": "alice-1", "grantor": "alice",
          "reason": "changed my mind"}}
JSON
broker ledger append --key alice.key --entry revoke.json
broker ledger cosign --key witness-1.key

step "the IRB suspends, then closes the study (study_suspended, study_closed)"
entry suspend.json <<'JSON'
{"kind": "study_suspended", "body": {"study": "t2d-outcomes", "reason": "interim safety review"}}
JSON
broker ledger append --key irb-boston.key --entry suspend.json
entry close.json <<'JSON'
{"kind": "study_closed", "body": {"study": "t2d-outcomes", "reason": "study completed"}}
JSON
broker ledger append --key irb-boston.key --entry close.json

step "the researcher rotates a key (key_rotated); the operator revokes the witness (principal_revoked)"
DR_LEE2=$(broker ledger keygen --name dr-lee --out dr-lee-2.key)
entry rotate.json <<JSON
{"kind": "key_rotated", "body": {"id": "dr-lee", "key": "$DR_LEE2"}}
JSON
broker ledger append --key dr-lee.key --entry rotate.json
entry revoke-witness.json <<'JSON'
{"kind": "principal_revoked", "body": {"id": "witness-1", "reason": "retired"}}
JSON
broker ledger append --key "$OPERATOR_KEY" --entry revoke-witness.json

step "proofs: inclusion of the receipt, consistency with the sponsor's older checkpoint"
broker ledger prove-inclusion --index 11
broker ledger prove-consistency --old "$OLD_SIZE"

step "the sponsor verifies the study offline with only the ledger's verifier key"
broker ledger verifier-key > ledger.pub
broker ledger bundle --study t2d-outcomes --consistency-from "$OLD_SIZE" --out bundle.json
broker ledger verify-bundle --verifier-key ledger.pub --bundle bundle.json --old-checkpoint "$SPONSOR_CHECKPOINT"

step "full verification of the ledger"
broker ledger verify

step "tamper detection: a copy of the ledger with one flipped bit is refused"
cp -r "$CONSENTRY_DATA_DIR/ledger" tampered
printf '\x01' | dd of=tampered/entries.log bs=1 seek=600 conv=notrunc status=none
mkdir -p tampered-root && mv tampered tampered-root/ledger
if CONSENTRY_DATA_DIR=$PWD/tampered-root broker ledger verify; then
  echo "tampering went unnoticed" >&2
  exit 1
fi
echo "walkthrough complete" >&2
