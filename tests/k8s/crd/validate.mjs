// Reads a JSON array of Kubernetes objects on stdin; validates every KEDA and Prometheus
// Operator object against the CRD's OpenAPI schema (kubernetes-models, generated from the CRDs).
// Prints one JSON line: {"validated": [kinds...], "errors": [...]}; exits 1 on any error.
import { readFileSync } from "node:fs";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";
import * as promop from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1": keda,
  "monitoring.coreos.com/v1": promop,
};
const objects = JSON.parse(readFileSync(0, "utf8"));
const validated = [];
const errors = [];
for (const obj of objects) {
  const group = models[obj.apiVersion];
  if (!group) continue;
  const Model = group[obj.kind];
  if (!Model) {
    errors.push(`${obj.apiVersion} ${obj.kind}: no schema known`);
    continue;
  }
  try {
    new Model(obj).validate();
    validated.push(`${obj.kind}/${obj.metadata.name}`);
  } catch (e) {
    errors.push(`${obj.kind}/${obj.metadata?.name}: ${e.message}`);
  }
}
console.log(JSON.stringify({ validated, errors }));
process.exit(errors.length ? 1 : 0);
