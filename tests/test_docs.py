"""The docs hold together: every relative link in README.md and docs/ names a file of the repository (and a
#heading of README.md, where it points at one), and the scripts point readers at docs/methods.md."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    assert os.path.join(ROOT, "docs", "methods.md") in pages
    broken = []
    for page in pages:
        for target in LINK.findall(open(page).read()):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
            elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", open(file).read(), re.M)}:
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_scripts_link_the_math():
    for script in ("train_rloo.py", "train_ppo.py", "train_nash_md.py", "train_xpo.py", "train_reward.py",
                   "train_grpo.py", "evaluate.py"):
        assert "docs/methods.md" in open(os.path.join(ROOT, script)).read(), script


def test_the_readme_test_command_is_what_ci_runs():
    # the README's "Run the tests" command, step by step, is .ci/run's (CI runs exactly what the README says)
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("**Run the tests**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    steps = [s.strip() for s in block.split("&&")]
    ci = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, ".ci", "run")) if line.strip()]
    ci = [line.replace("pip install -q", "pip install") for line in ci if line and not line.startswith(("set ", "cd "))]
    *setup, test = steps
    assert ci[:len(setup)] == setup, (ci, setup)
    env, command = test.rsplit(" python ", 1)
    assert ci[len(setup):] == [f"export {env}", f"python {command}"], ci
    # and the main job's command sets up the same way before it runs the world's pipeline
    main = readme.split("**Run the main job**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert main.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install")
