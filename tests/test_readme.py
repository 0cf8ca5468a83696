"""README.md's two set-up commands: exactly two, and .ci/run runs the test one verbatim."""
import re


def _setup_commands(readme: str) -> list[str]:
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one(repo_dir):
    commands = _setup_commands((repo_dir / "README.md").read_text(encoding="utf-8"))
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "bash reproduce.sh sample" in demo
    assert "pytest" in tests
    ci_lines = [line for line in (repo_dir / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [tests]


def test_demo_script_exists(repo_dir):
    assert (repo_dir / "reproduce.sh").is_file()
