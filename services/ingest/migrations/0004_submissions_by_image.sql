-- `already_stored` is answered per project (issue 16): find a project's earlier submissions of an image.
CREATE INDEX submissions_project_image ON submissions (project, image_id);
