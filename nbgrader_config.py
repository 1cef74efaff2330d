"""nbgrader configuration: instructors edit solutions/, students get labs/ (see README, instructor guide)."""

c = get_config()  # noqa: F821 (injected by nbgrader)

c.CourseDirectory.root = "."
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
c.CourseDirectory.db_url = "sqlite:///gradebook.db"
# Whole-notebook runs train models: raise the 30 s per-cell default; a hung cell still ends.
c.ExecutePreprocessor.timeout = 900
c.Execute.timeout = 900
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
