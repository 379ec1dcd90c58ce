#!/usr/bin/env bash
# Exports the package folders of a git revision into .ab_base/, the baseline tree
# that `scripts/gpu_check.sh ab` times against this checkout in the same run.
#
#   scripts/ab_base.sh REV      (e.g. HEAD, main~3, a commit id)
#
# Run it where the git history is; .ab_base/ is git-ignored, so a copy of the
# working tree taken to a GPU machine must name it among the paths it carries.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/ab_base.sh REV}
git rev-parse --verify --quiet "$rev^{commit}" > /dev/null || { echo "no such revision: $rev" >&2; exit 2; }
rm -rf .ab_base.tmp && mkdir .ab_base.tmp
# the bundled demo model's weights are not needed to time random-weight workspaces
git archive "$rev" cluster engine kernels parallel quant | tar -x -C .ab_base.tmp --exclude='engine/demo_model/*'
git rev-parse "$rev" > .ab_base.tmp/REVISION
rm -rf .ab_base && mv .ab_base.tmp .ab_base
echo ".ab_base/: $(cat .ab_base/REVISION) ($(du -sh .ab_base | cut -f1))"
